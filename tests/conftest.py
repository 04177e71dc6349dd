"""Shared test set-up (CPU only, deterministic, quiet) and the fixtures several test modules use."""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Tests never read or fill the user's compilation cache. They share one of their own for the run instead: most of
# a tiny model's test time is XLA compiling the same few programs again in each test and each subprocess (train.py,
# `cxrllava`), which inherit this environment. Every size counts (JAX keeps only compiles over a second by default).
os.environ.setdefault("CXRLLAVA_COMPILATION_CACHE", "off")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = RUN_CACHE = tempfile.mkdtemp(prefix="cxrllava-tests-xla-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
else:
    RUN_CACHE = None

import pytest  # noqa: E402  (after the environment: importing JAX reads it)


def pytest_sessionfinish(session, exitstatus):
    if RUN_CACHE:
        shutil.rmtree(RUN_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def server_logging_restored():
    """Each test leaves the server's loggers as it found them: `cxrllava serve` run in-process (or
    `configure_logging`) points them at this test's captured stderr, which is closed once the test ends, and every
    later log line would then fail to write."""
    import logging

    names = ("cxrllava", "cxrllava_jax", "uvicorn")  # observability.SERVER_LOGGERS, without importing the server
    saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).level,
                    logging.getLogger(name).propagate) for name in names}
    yield
    for name, (handlers, level, propagate) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:], logger.propagate = handlers, propagate
        logger.setLevel(level)


@pytest.fixture(scope="session")
def model():
    """The tiny CXR-LLaVA behind the Python API (cxrllava_jax/reference/tiny_models.py), loaded once per run."""
    from cxrllava_jax.inference.api import CXRLLaVA
    from cxrllava_jax.reference.tiny_models import checkpoint_dir

    return CXRLLaVA.from_pretrained(checkpoint_dir())


@pytest.fixture(scope="session")
def imported_checkpoint(tmp_path_factory):
    """The tiny release imported by `cxrllava import-torch` in this session, so that it is what today's code writes
    (e.g. the tokenizer fingerprint); shared by the fault suites."""
    from cxrllava_jax import cli
    from cxrllava_jax.reference.tiny_models import release_dir

    out = tmp_path_factory.mktemp("imported") / "ckpt"
    assert cli.main(["import-torch", "--src", str(release_dir()), "--out", str(out)]) == 0
    return out
