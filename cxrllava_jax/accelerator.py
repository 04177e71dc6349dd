"""Processes sharing one accelerator: how much of its memory each JAX process takes.

JAX's GPU client preallocates 75% of the card when it starts, so a second JAX process on the same GPU (a
benchmark that loads a model and then starts `cxrllava serve`, a device check that serves while it holds its
own arrays) fails to allocate. Each process of such a group takes an equal share instead, set in its
environment before JAX starts its backend. A user's own memory settings always win.
"""

import os

MEMORY_VARIABLES = ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_ALLOCATOR")
USABLE = 0.9  # of the card, split between the processes (the rest: CUDA contexts, cuDNN and cuBLAS workspaces)


def shared_memory_env(processes: int, env=os.environ) -> dict[str, str]:
    """The variables that give one of `processes` JAX processes on one accelerator its share of the memory (one
    process: all that is usable, not JAX's 75%); none where the user set any of JAX's memory variables."""
    if any(name in env for name in MEMORY_VARIABLES):
        return {}
    return {"XLA_PYTHON_CLIENT_MEM_FRACTION": f"{USABLE / processes:.2f}"}


def share_memory(processes: int):
    """Gives this process its share: call it before JAX's first computation (the backend reads it then)."""
    os.environ.update(shared_memory_env(processes))
