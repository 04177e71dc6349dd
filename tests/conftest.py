"""Shared test set-up: CPU only, deterministic, quiet."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Tests compile their own programs; they neither read nor fill the user's compilation cache.
os.environ.setdefault("CXRLLAVA_COMPILATION_CACHE", "off")
