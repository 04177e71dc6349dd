"""JAX processes on one accelerator each take a share of its memory, unless the user set JAX's own variables."""

from cxrllava_jax.accelerator import shared_memory_env


def test_processes_on_one_accelerator_share_its_memory_unless_the_user_says():
    assert shared_memory_env(2, {}) == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.45"}
    assert shared_memory_env(1, {}) == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.90"}
    for users in ({"XLA_PYTHON_CLIENT_MEM_FRACTION": ".3"}, {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}):
        assert shared_memory_env(2, users) == {}
