"""Weight-only quantization of the language model with Qwix: int8 with one scale per output channel, or int4
with one scale per group of input channels. Activations and the image tower stay in the compute dtype.

    model = quantized(CXRLLaVA(config, runtime), "int8")        # the same module, its matmuls intercepted
    template = abstract_params(model, config)                   # where each quantized weight goes, and how
    leaf = quantize_leaf(template, "llm/layers/block_0/q_proj/kernel", kernel)

Quantizing one weight at a time lets a loader turn each tensor into int8/int4 as it reads it, so the model
never exists in full precision.
"""

import functools
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import qwix
from qwix._src.core import qarray as qwix_qarray  # calibrate and quantize with a given scale: not re-exported

from cxrllava_jax.errors import ConfigError

KINDS = ("int8", "int4")
# The language model's projections and its lm_head (CXR-LLaVA nests it under llm/); the embedding is a
# gather, the norms are vectors, the ViT and the projector are a small share of the weights.
LANGUAGE_MODEL_MATMULS = r"(llm/)?(layers/.*|lm_head)"
# The model methods generation calls: inside them every matmul on a quantized weight is intercepted.
METHODS = ("__call__", "extend", "step", "image_features")
INT4_GROUP = 128


def check_kind(kind: str | None):
    if kind not in (None, *KINDS):
        raise ConfigError(f"quantize={kind!r}: expected one of {', '.join(KINDS)} (or none)")


def rules(kind: str, llama_config) -> list:
    if kind == "int8":
        return [qwix.QuantizationRule(module_path=LANGUAGE_MODEL_MATMULS, weight_qtype="int8")]
    if kind == "int4":
        # Groups of 128 input channels (LLaMA's widths are multiples of it); smaller models use the largest
        # group that divides their widths.
        c = llama_config
        group = math.gcd(INT4_GROUP, c.hidden_size, c.intermediate_size, c.resolved_head_dim)
        return [qwix.QuantizationRule(module_path=LANGUAGE_MODEL_MATMULS, weight_qtype="int4", tile_size=group)]
    check_kind(kind)


def quantized(model: nn.Module, kind: str) -> nn.Module:
    """`model` (a Llama or a CXRLLaVAModel) whose language-model matmuls run on `kind` weights."""
    llama_config = getattr(model.config, "llama", model.config)
    methods = [name for name in METHODS if hasattr(type(model), name)]  # image_features: CXR-LLaVA's only
    return qwix.quantize_model(model, qwix.PtqProvider(rules(kind, llama_config)), methods=methods)


def abstract_params(model: nn.Module, *init_args) -> dict:
    """The model's parameter tree as shapes (boxed with logical axis names), quantized leaves as Qwix
    `WithAux` templates. No weight is made."""
    return jax.eval_shape(model.init, jax.random.key(0), *init_args)["params"]


def quantize_leaf(template: dict, path: str, array):
    """One weight at `path` ('llm/layers/block_0/q_proj/kernel'): quantized if the template says so."""
    leaf = _at(template, path)
    if not is_quantized(leaf):
        return array
    return _quantizer(leaf)(jnp.asarray(array))


_QUANTIZERS: dict[str, Callable] = {}


def _quantizer(leaf) -> Callable:
    """One compiled program per kind of weight (its shape and how it is quantized; the layers share them):
    run op by op, quantizing would hold several float32 copies of the largest matrix at once.

    A scanned stack's weight [layers, *kernel] is quantized layer by layer (`lax.map`, so one layer's float32
    at a time): the template's `how` (which axes get their own scales) is the one layer's the model computes
    with, so it cannot be applied to the stack."""
    key = repr(leaf)
    if key not in _QUANTIZERS:
        # Shapes only: no sharding constraint (which would need a mesh-placed value under an active mesh).
        template = jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x,
                                leaf, is_leaf=lambda x: isinstance(x, nn.Partitioned))

        def quantize(array, template=template):
            return template.replace(array=_quantize(array, template.how))

        if not _fits(quantize, template):
            layer = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), template)
            quantize = functools.partial(jax.lax.map, functools.partial(quantize, template=layer))
        _QUANTIZERS[key] = jax.jit(quantize)
    return _QUANTIZERS[key]


def _fits(quantize, template) -> bool:
    """Whether quantizing the whole weight as `template.how` says gives the template's shapes."""
    try:
        made = jax.eval_shape(quantize, jax.ShapeDtypeStruct(template.shape, jnp.float32))
    except ValueError:  # tiles that do not divide the stacked axes
        return False
    return [x.shape for x in jax.tree.leaves(made)] == [x.shape for x in jax.tree.leaves(template)]


def dequantized(leaf):
    """A weight as a float array (in its scales' dtype) if it is quantized, else as it is."""
    return qwix.dequantize(leaf.array) if is_quantized(leaf) else leaf


def _quantize(array, how) -> qwix.QArray:
    """Qwix's symmetric absmax quantization (scale = max |w| over a channel or group / (qmax + 1/2)), computed
    in float32 with the scale rounded up to the weight's dtype: Qwix alone works in the weight's dtype, and in
    bfloat16 (8 significant bits: steps of 0.5 near 127) weight / scale and the rounded scale each move a
    value by up to a quarter of an int8 step. Rounding the scale up keeps every weight within range, so none
    is further than half a step (of its stored scale) from its quantized value. The scale stays in the
    weight's dtype, the dtype the dequantized matmul runs in."""
    # max |w| is exact in any dtype; taking it from the weight as stored keeps the float32 copy of the weight
    # to the one elementwise pass that rounds it (no float32 matrix is kept for the reduction).
    absmax = {name: value.astype(jnp.float32) for name, value in qwix_qarray.calibrate(array, how).items()}
    scale, _ = qwix_qarray.compute_scale_zero_point(absmax, how.qtype)
    stored = scale.astype(array.dtype)
    stored = jnp.where(stored.astype(jnp.float32) < scale, jnp.nextafter(stored, jnp.inf), stored)
    quantized = qwix_qarray.quantize_with_scale_zero_point(array.astype(jnp.float32), how.qtype,
                                                           stored.astype(jnp.float32), None)
    return quantized.replace(scale=stored)


def is_quantized(leaf) -> bool:
    """A Qwix `WithAux` leaf (the quantized array and how it was made) holding a `QArray`."""
    return isinstance(getattr(leaf, "array", None), qwix.QArray)


def _at(tree, path: str):
    for part in path.split("/"):
        tree = tree[part]
    return tree
