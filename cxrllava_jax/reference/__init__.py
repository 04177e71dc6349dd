"""Reference implementations and tiny models that tests and benchmarks measure the library against.

Not used by the library itself; needs the `test` extra (PyTorch).
"""
