"""Shared test set-up: CPU only, deterministic, quiet."""

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def imported_checkpoint(tmp_path_factory):
    """The tiny release (tests/inference_fixtures.py) imported by `cxrllava import-torch` in this session, so that it
    is what today's code writes (e.g. the tokenizer fingerprint), shared by the fault suites."""
    from cxrllava_jax import cli
    from inference_fixtures import release_dir

    out = tmp_path_factory.mktemp("imported") / "ckpt"
    assert cli.main(["import-torch", "--src", str(release_dir()), "--out", str(out)]) == 0
    return out
