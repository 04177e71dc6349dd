"""The attention kernels agree with the XLA path on CPU: splash through Pallas' interpreter, cuDNN's
arguments (causal mode plus key lengths for right-padded rows) through `jax.nn.dot_product_attention`'s XLA
implementation. Compared at real (non-padding) query positions, the only ones anything reads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxrllava_jax.models import attention
from cxrllava_jax.models.attention import CausalMask
from cxrllava_jax.models.configs import LLAMA_PRESETS, Runtime
from cxrllava_jax.models.llama import Llama

LENGTH = 128


def qkv(kv_heads: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    shape = (3, LENGTH, 4, 16)
    q = rng.standard_normal(shape, np.float32)
    k, v = (rng.standard_normal(shape[:2] + (kv_heads, 16), np.float32) for _ in range(2))
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def right_padded(lengths):
    return jnp.arange(LENGTH)[None, :] < jnp.asarray(lengths)[:, None]


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_splash_and_cudnn_equal_xla_on_causal_padded_rows(kv_heads):
    q, k, v = qkv(kv_heads)
    valid = right_padded([LENGTH, 100, 37])
    mask = CausalMask(valid, right_padded=True)
    expected = attention.attend(q, k, v, mask, kernel="xla")
    real = np.asarray(valid)
    for name, out in {"splash": attention.splash(q, k, v, mask),
                      "cudnn": attention.cudnn(q, k, v, mask, implementation="xla")}.items():
        np.testing.assert_allclose(np.asarray(out)[real], np.asarray(expected)[real], atol=2e-5, err_msg=name)


def test_splash_on_left_padded_rows_and_without_mask():
    q, k, v = qkv(4, seed=1)
    valid = ~right_padded([0, 20, 90])  # rows 1 and 2 padded on the left
    mask = CausalMask(valid)
    real = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(attention.splash(q, k, v, mask))[real],
                               np.asarray(attention.attend(q, k, v, mask))[real], atol=2e-5)
    np.testing.assert_allclose(attention.splash(q, k, v, None), attention.attend(q, k, v, None), atol=2e-5)
    # Left padding is not what cuDNN's key lengths describe: the dense mask goes to the kernel instead.
    np.testing.assert_allclose(np.asarray(attention.cudnn(q, k, v, mask, implementation="xla"))[real],
                               np.asarray(attention.attend(q, k, v, mask))[real], atol=2e-5)


def test_splash_gradients_equal_xla():
    q, k, v = qkv(2, seed=2)
    valid = right_padded([LENGTH, 64, 100])
    weights = valid[:, :, None, None].astype(jnp.float32)  # only real positions feed the loss

    def loss(kernel):
        return lambda q, k, v: (attention.attend(q, k, v, CausalMask(valid, True), kernel=kernel) ** 2 * weights).sum()

    expected = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(loss("splash"), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", got, expected):
        np.testing.assert_allclose(a, b, atol=1e-4, err_msg=name)


def test_llama_logits_agree_across_kernels():
    config = LLAMA_PRESETS["llama_tiny_gqa"]
    tokens = jnp.asarray(np.random.default_rng(3).integers(3, config.vocab_size, (2, LENGTH)), jnp.int32)
    valid = right_padded([LENGTH, 90])
    params = Llama(config, Runtime()).init(jax.random.key(0), tokens, valid)
    expected, _ = Llama(config, Runtime()).apply(params, tokens, valid)
    got, _ = Llama(config, Runtime(attention="splash")).apply(params, tokens, valid)
    real = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(expected)[real], atol=1e-4)


def test_auto_is_xla_on_cpu_and_unknown_kernels_are_refused():
    assert attention.resolve("auto") == "xla"
    with pytest.raises(ValueError, match="runtime.attention"):
        attention.resolve("flash")


@pytest.mark.parametrize("case", ["odd_no_mask", "key_padding", "odd_key_padding", "dense_left_padded_odd"])
def test_cudnn_arguments_equal_xla_for_encoders_and_prompts(case):
    """What the cuDNN path hands the kernel (key lengths, a full-shape bias, one slot of padding for odd lengths),
    run through XLA, equals the plain XLA path at every real query."""
    length = 17 if "odd" in case else 16
    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(rng.standard_normal((3, length, 4, 16), np.float32)) for _ in range(3))
    valid = jnp.arange(length)[None, :] < jnp.asarray([length, 9, 3])[:, None]
    mask, real = {"odd_no_mask": (None, np.ones((3, length), bool)),
                  "key_padding": (attention.KeyMask(valid, right_padded=True), np.ones((3, length), bool)),
                  "odd_key_padding": (attention.KeyMask(valid, right_padded=True), np.ones((3, length), bool)),
                  "dense_left_padded_odd": (CausalMask(valid[:, ::-1]), np.asarray(valid[:, ::-1]))}[case]
    expected = attention.attend(q, k, v, mask, kernel="xla")
    got = attention.cudnn(q, k, v, mask, implementation="xla")
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(expected)[real], atol=2e-5)
