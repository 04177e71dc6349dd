"""Weight-only int8 on a tiny LLaMA whose predictions are decisive (trained for a few seconds on a fixed
template, cxrllava_jax/reference/trained_llama.py): the per-channel scales are what symmetric int8 is, and
greedy decoding gives the same tokens as the bf16 model. (On an untrained model the top logits are often
closer together than int8's error, so equal tokens there would be luck: benchmarks/bench_quantization.py
reports how many agree on both models.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cxrllava_jax.models import quantize
from cxrllava_jax.inference.engine import Engine, Request, SamplingOptions
from cxrllava_jax.models.configs import Runtime
from cxrllava_jax.models.llama import Llama
from cxrllava_jax.reference.trained_llama import CONFIG, chain_prompts, trained_llama

BF16 = Runtime(dtype="bfloat16", param_dtype="bfloat16")
NEVER = -1  # an EOS id no token equals: every row generates its whole budget
NEW_TOKENS = 24
# Kernels by the axes a matmul contracts (the input channels); every other axis is an output channel.
INPUT_AXES = {"q_proj": (0,), "k_proj": (0,), "v_proj": (0,), "o_proj": (0, 1), "gate_proj": (0,), "up_proj": (0,),
              "down_proj": (0,), "lm_head": (0,)}


@pytest.fixture(scope="module")
def trained():
    params, chain = trained_llama()
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params), chain


def _quantized_weights(model, params):
    template = quantize.abstract_params(model, jnp.zeros((1, 1), jnp.int32))
    flat = traverse_util.flatten_dict(params, sep="/")
    return traverse_util.unflatten_dict({p: quantize.quantize_leaf(template, p, a) for p, a in flat.items()}, sep="/")


@pytest.fixture(scope="module")
def int8(trained):
    model = quantize.quantized(Llama(CONFIG, BF16), "int8")
    return model, _quantized_weights(model, trained[0])


def test_int8_scales_are_symmetric_max_abs_per_output_channel(trained, int8):
    """Each output channel's scale is its largest |weight| over the input channels / 127.5 (Qwix's symmetric
    bound: 127 + 1/2, so the top bucket is whole), rounded up to bfloat16; every weight is within half a step
    of its int8 value; no zero point."""
    params = traverse_util.flatten_dict(trained[0], sep="/")
    kernels = {p: leaf for p, leaf in traverse_util.flatten_dict(int8[1], sep="/").items() if p.endswith("kernel")}
    assert sorted({p.split("/")[-2] for p in kernels}) == sorted(INPUT_AXES)
    for path, leaf in kernels.items():
        inputs = INPUT_AXES[path.split("/")[-2]]
        weight = np.asarray(params[path], np.float64)
        qvalue = np.asarray(leaf.array.qvalue).astype(np.int64)
        scale = np.asarray(leaf.array.scale, np.float64)
        assert leaf.array.qvalue.dtype == jnp.int8 and leaf.array.scale.dtype == jnp.bfloat16, path
        assert leaf.array.zero_point is None, path
        bound = np.abs(weight).max(axis=inputs, keepdims=True) / 127.5
        assert scale.shape == bound.shape and np.all((scale >= bound) & (scale <= bound * (1 + 2**-7))), path
        assert np.all(np.abs(weight - qvalue * scale) <= 0.5 * scale), path
        assert qvalue.min() >= -128 and np.abs(qvalue).max(axis=inputs).min() >= 126, path  # the range is used
    assert not quantize.is_quantized(int8[1]["embed_tokens"]["embedding"])


def test_int8_greedy_tokens_equal_bf16(trained, int8):
    params, chain = trained
    prompts = list(chain_prompts(chain, count=8, length=12, seed=7))
    greedy = SamplingOptions(temperature=0.0, max_new_tokens=NEW_TOKENS)
    def complete(model, weights) -> list[list[int]]:
        engine = Engine(model, {"params": weights}, eos_id=NEVER)
        return [c.tokens for c in engine.complete([Request(p, sampling=greedy) for p in prompts])]

    exact = complete(Llama(CONFIG, BF16), params)
    # The bf16 model learned the template: its continuations follow the chain, so its choices are decisive.
    assert exact == [chain_prompts(chain, 8, 12 + NEW_TOKENS, seed=7)[i, 12:].tolist() for i in range(8)]
    model, weights = int8
    assert complete(model, weights) == exact
