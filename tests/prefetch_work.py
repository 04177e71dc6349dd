"""Work for `inference.prefetch`'s worker processes in the tests: a module that imports nothing heavy, so that each
worker starts in a fraction of a second."""

import os

from cxrllava_jax.errors import InputError


def dies_on_crash(item: str) -> str:
    if item == "crash":
        os._exit(1)  # as a decoder's segfault or the kernel's out-of-memory kill ends a worker
    if item == "bad":
        raise InputError("bad: not an image")
    return item.upper()
