"""LoRA and QLoRA adapters on any of our models, with Qwix doing the mechanics.

`with_lora(model, settings)` returns the same Linen model with Qwix's `LoraProvider` intercepting the
`dot_general` of every Dense whose module path matches one of `settings.targets` (regexes over our module
paths: `llm/layers/block_3/q_proj`, or `llm/layers/block/q_proj` with scanned layers). Qwix adds two
parameters beside the frozen kernel, `kernel_lora_a` [*layers, fan_in, rank] and `kernel_lora_b`
[*layers, rank, fan_out], and the layer computes `x @ W + (alpha / rank) * (dropout(x) @ A) @ B`.
`settings.weight_qtype` ('int8', 'int4', 'nf4') asks Qwix to keep the targeted kernels quantized (QLoRA);
fine-tuning refuses it for now (see training/tasks.py FinetuneTask).

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
METHODS = ("__call__", "encode_images", "embed", "decode", "hidden_states", "logits_at")


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    weight_qtype: str | None = None  # QLoRA: the frozen targeted kernels stored as 'int8', 'int4' or 'nf4'

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("LoRA needs at least one target module regex")
        for target in self.targets:
            try:
                re.compile(target)
            except re.error as error:
                raise ValueError(f"LoRA target {target!r} is not a regex: {error}") from None
        if self.weight_qtype not in (None, "int8", "int4", "nf4"):
            raise ValueError(f"LoRA weight_qtype must be None, 'int8', 'int4' or 'nf4', got {self.weight_qtype!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def with_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """`model` with adapters on the modules `settings.targets` match (Qwix model surgery, no copy of code)."""
    rules = [qwix.LoraRule(module_path=target, rank=settings.rank, alpha=settings.alpha, dropout=settings.dropout,
                           weight_qtype=settings.weight_qtype) for target in settings.targets]
    return qwix.apply_lora_to_model(model, qwix.LoraProvider(rules), methods=METHODS)


def is_adapter(path: str) -> bool:
    return path.endswith(ADAPTER_SUFFIXES)


def check_targets(params, settings: LoraSettings):
    """Every target regex must have put an adapter somewhere: a typo would otherwise train nothing there."""
    modules = {path.rsplit("/", 1)[0] for path in traverse_util.flatten_dict(params, sep="/") if is_adapter(path)}
    unused = [t for t in settings.targets if not any(re.fullmatch(t, m) for m in modules)]
    if unused:
        raise ValueError(f"LoRA targets {unused} match no dense layer of the model; module paths look like "
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

    return jax.tree_util.tree_map_with_path(cast, params)


def merge(params, settings: LoraSettings):
    """The model with every adapter folded into its kernel (`W + scale * A @ B`, in fp32) and removed: a plain
    checkpoint of the base architecture that gives the adapted model's outputs."""
    flat = traverse_util.flatten_dict(params, sep="/")
    merged = {k: v for k, v in flat.items() if not is_adapter(k)}
    for path in (k for k in flat if k.endswith("_lora_a")):
        name = path[:-len("_lora_a")]
        kernel = merged[name]
        delta = jnp.matmul(jnp.asarray(flat[path], jnp.float32), jnp.asarray(flat[name + "_lora_b"], jnp.float32))
        merged[name] = (jnp.asarray(kernel, jnp.float32) + settings.scale * delta.reshape(kernel.shape)).astype(
            kernel.dtype)
    return traverse_util.unflatten_dict(merged, sep="/")
