"""CXR-LLaVA in JAX/Flax: models, training for every stage, inference, evaluation, PyTorch conversion."""

__version__ = "0.1.0"
