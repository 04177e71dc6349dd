"""The persistent compilation cache that inference turns on: where it goes, how to move or turn it off, and
that a compiled program lands there."""

import os
import subprocess
import sys

PROGRAM = """
import jax
from cxrllava_jax.inference import compile_cache
print(compile_cache.enable())
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.jit(lambda x: x * 2 + 1)(1.0).block_until_ready()
"""


def _run_with(tmp_path, **extra) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("CXRLLAVA_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    env.update(JAX_PLATFORMS="cpu", XDG_CACHE_HOME=str(tmp_path / "xdg"), **extra)
    out = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_on_by_default_in_the_user_cache_directory(tmp_path):
    expected = tmp_path / "xdg" / "cxrllava-jax" / "xla"
    assert _run_with(tmp_path) == str(expected)
    assert any(expected.iterdir())  # the program was written


def test_directory_from_the_environment_or_off(tmp_path):
    assert _run_with(tmp_path, CXRLLAVA_COMPILATION_CACHE=str(tmp_path / "mine")) == str(tmp_path / "mine")
    assert any((tmp_path / "mine").iterdir())
    assert _run_with(tmp_path, CXRLLAVA_COMPILATION_CACHE="off") == "None"
    assert not (tmp_path / "xdg").exists()
