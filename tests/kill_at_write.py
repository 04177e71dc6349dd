"""Runs a command and kills itself with SIGKILL at one of its write points, as a crash or an OOM kill would:

    python tests/kill_at_write.py POINT N cxrllava SUBCOMMAND ARGS...   (or: ... POINT N eval.py ARGS...)

POINT is where the N-th call is stopped (all in cxrllava_jax.files): `replace` (a finished file about to be renamed
into place), `append` (a record about to be appended), `swap` (a finished staged directory about to take its
destination's place: synth, eval.py, export-torch, import-torch)."""

import os
import runpy
import signal
import sys

from cxrllava_jax import cli, files


def kill_at(owner, name: str, n: int):
    original, calls = getattr(owner, name), [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(owner, name, wrapped)


if __name__ == "__main__":
    point, n, program, *argv = sys.argv[1:]
    owner, name = {"replace": (files, "_replace"), "append": (files.LockedAppender, "write"),
                   "swap": (files, "_swap_in")}[point]
    kill_at(owner, name, int(n))
    if program == "cxrllava":
        sys.exit(cli.main(argv))
    sys.argv = [program, *argv]
    runpy.run_path(program, run_name="__main__")
