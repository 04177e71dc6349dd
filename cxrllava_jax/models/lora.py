"""LoRA and QLoRA adapters on any of our models, with Qwix doing the mechanics.

`with_lora(model, settings)` returns the same Linen model with Qwix's `LoraProvider` intercepting the
`dot_general` of every Dense whose module path matches one of `settings.targets` (regexes over our module
paths: `llm/layers/block_3/q_proj`, or `llm/layers/block/q_proj` with scanned layers). Qwix adds two
parameters beside the frozen kernel, `kernel_lora_a` [*layers, fan_in, rank] and `kernel_lora_b`
[*layers, rank, fan_out], and the layer computes `x @ W + (alpha / rank) * (dropout(x) @ A) @ B`.
`settings.base_quantize` ('int8', 'int4') is QLoRA: the language model's matmul weights held quantized exactly
as inference quantizes them (models/quantize.py: its rules, its quantizer), the adapters on top in fp32.
Qwix 0.1.8 cannot create the adapters while it quantizes inside a traced init (its find_param loses the 3-D
attention kernels), so the parameters are made in two steps: `with_lora(model, float_settings(settings))`
initialises a float base with its adapters, and `quantize_base` quantizes that base (after the real weights are
loaded), which `with_lora(model, settings)` then runs.

Adapters live in the parameter tree at fixed names, so freezing, checkpoints and conversion treat them
as ordinary parameters: `BASE_PATTERN` matches all the others.
"""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import qwix
from flax import traverse_util

from cxrllava_jax.errors import ConfigError
from cxrllava_jax.models import quantize

# The LLM's attention and MLP projections (unrolled `block_3` or scanned `block`): the default targets.
LLM_ATTENTION = r"llm/layers/block(_\d+)?/(q|k|v|o)_proj"
LLM_MLP = r"llm/layers/block(_\d+)?/(gate|up|down)_proj"
PROJECTOR = r"projector/.*"
VIT = r"img/resblocks(_\d+)?/(attn/.*|mlp/.*)"
DEFAULT_TARGETS = (LLM_ATTENTION, LLM_MLP)
ADAPTER_SUFFIXES = ("_lora_a", "_lora_b")
# Everything that is not an adapter: `config.frozen` of a LoRA run.
BASE_PATTERN = r"(?!.*_lora_[ab]$).*"
# The model methods that compute with the adapted layers (the training loss calls logits_at).
METHODS = ("__call__", "encode_images", "embed", "cached_forward", "hidden_states", "logits_at")


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    base_quantize: str | None = None  # QLoRA: the language model's frozen weights as 'int8' or 'int4'

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ConfigError("LoRA needs at least one target module regex")
        for target in self.targets:
            try:
                re.compile(target)
            except re.error as error:
                raise ConfigError(f"LoRA target {target!r} is not a regex: {error}") from None
        if self.base_quantize not in (None, *quantize.KINDS):
            raise ConfigError(f"LoRA base_quantize must be None or one of {quantize.KINDS}, got {self.base_quantize!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def with_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """`model` with adapters on the modules `settings.targets` match (Qwix model surgery, no copy of code); with
    `settings.base_quantize`, on a base whose language-model matmuls run on the quantized weights `quantize_base`
    makes (the first rule a module matches is its rule)."""
    adapter = dict(rank=settings.rank, alpha=settings.alpha, dropout=settings.dropout)
    if settings.base_quantize is None:
        rules = [qwix.LoraRule(module_path=target, **adapter) for target in settings.targets]
    else:
        base = quantize.rules(settings.base_quantize, getattr(model.config, "llama", model.config))
        how = dict(weight_qtype=base[0].weight_qtype, tile_size=base[0].tile_size)
        # A target inside the quantized language model adapts a quantized weight; one outside (projector, ViT)
        # a float one; the language model's other matmuls (lm_head) run quantized without an adapter.
        rules = [qwix.LoraRule(module_path=f"(?=(?:{rule.module_path})$)(?:{target})", **adapter, **how)
                 for target in settings.targets for rule in base]
        rules += [qwix.LoraRule(module_path=target, **adapter) for target in settings.targets] + base
    return qwix.apply_lora_to_model(model, qwix.LoraProvider(rules), methods=METHODS)


def float_settings(settings: LoraSettings) -> LoraSettings:
    """The same adapters on a float base: the model that creates QLoRA's parameters (see the module docstring)."""
    return dataclasses.replace(settings, base_quantize=None)


def quantize_base(params, model: nn.Module, kind: str, *init_args):
    """`params` (unboxed, float base plus adapters) with the language model's weights quantized as inference
    quantizes `model` (the plain model, without adapters). Each weight is quantized on its own (layer by layer
    for a stack), so no float32 copy of the whole base is made. Abstract leaves (`jax.ShapeDtypeStruct`) give
    abstract quantized ones, on the source weight's devices whole (QLoRA is for one device)."""
    template = quantize.abstract_params(quantize.quantized(model, kind), *init_args)

    def held(path, leaf):
        if is_adapter(path):
            return leaf
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            return quantize.quantize_leaf(template, path, leaf)
        made = jax.eval_shape(lambda x: quantize.quantize_leaf(template, path, x), leaf)
        if made is leaf or not quantize.is_quantized(made):
            return leaf
        whole = leaf.sharding
        if isinstance(whole, jax.sharding.NamedSharding):
            whole = jax.sharding.NamedSharding(whole.mesh, jax.sharding.PartitionSpec())
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=whole), made)

    flat = traverse_util.flatten_dict(params, sep="/")
    return traverse_util.unflatten_dict({k: held(k, v) for k, v in flat.items()}, sep="/")


def is_adapter(path: str) -> bool:
    return path.endswith(ADAPTER_SUFFIXES)


def check_targets(params, settings: LoraSettings):
    """Every target regex must have put an adapter somewhere: a typo would otherwise train nothing there."""
    modules = {path.rsplit("/", 1)[0] for path in traverse_util.flatten_dict(params, sep="/") if is_adapter(path)}
    unused = [t for t in settings.targets if not any(re.fullmatch(t, m) for m in modules)]
    if unused:
        raise ConfigError(f"LoRA targets {unused} match no dense layer of the model; module paths look like "
                          f"'llm/layers/block_0/q_proj', 'projector/linear', 'img/resblocks_0/attn/out_proj'")


def adapters(params) -> dict:
    """{path: array} of the adapter parameters alone (flat, '/'-joined paths)."""
    return {k: v for k, v in traverse_util.flatten_dict(params, sep="/").items() if is_adapter(k)}


def cast_base(params, dtype):
    """The frozen base in `dtype` (bf16 halves its memory); the adapters stay fp32. Works on boxed
    (partitioned) trees as `init` returns them."""
    def cast(path, leaf):
        keep = any(is_adapter(str(getattr(k, "key", k))) for k in path)
        return leaf if keep else leaf.astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, params, is_leaf=quantize.is_quantized)


def merge(params, settings: LoraSettings):
    """The model with every adapter folded into its kernel (`W + scale * A @ B`, in fp32) and removed: a plain
    checkpoint of the base architecture that gives the adapted model's outputs. A quantized (QLoRA) base is
    dequantized first: the adapters were trained on top of those weights."""
    flat = traverse_util.flatten_dict(params, sep="/")
    merged = {k: quantize.dequantized(v) for k, v in flat.items() if not is_adapter(k)}
    for path in (k for k in flat if k.endswith("_lora_a")):
        name = path[:-len("_lora_a")]
        kernel = merged[name]
        delta = jnp.matmul(jnp.asarray(flat[path], jnp.float32), jnp.asarray(flat[name + "_lora_b"], jnp.float32))
        merged[name] = (jnp.asarray(kernel, jnp.float32) + settings.scale * delta.reshape(kernel.shape)).astype(
            kernel.dtype)
    return traverse_util.unflatten_dict(merged, sep="/")
