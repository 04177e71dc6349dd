"""Shared test set-up (CPU only, deterministic, quiet) and the fixtures several test modules use."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402  (after the environment: importing JAX reads it)


@pytest.fixture(scope="session")
def model():
    """The tiny CXR-LLaVA behind the Python API (cxrllava_jax/reference/tiny_models.py), loaded once per run."""
    from cxrllava_jax.inference.api import CXRLLaVA
    from cxrllava_jax.reference.tiny_models import checkpoint_dir

    return CXRLLaVA.from_pretrained(checkpoint_dir())
