"""The language model: LLaMA-2 (Hugging Face `LlamaForCausalLM` semantics) with a preallocated KV cache.

The cache is an explicit pytree `{"k", "v"}: [layers, batch, kv_heads, max_length, head_dim]` passed in
and returned, so prefill and decode are pure functions that `jit` and `lax.while_loop` can carry. It travels
with the layer stack's carry (unrolled or `nn.scan`), and each layer writes its new keys/values at
`cache_index` into it with one dynamic-update-slice, so XLA updates the buffer in place instead of slicing a
layer out and stacking the layers again. Which slots a query may see is the caller's mask, whose width
says how many leading slots attention reads: a decode step costs in proportion to the filled context.
Each (row, kv head) holds its slots as one contiguous [length, head_dim] matrix, the operand of the
decode step's matrix-vector products.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from cxrllava_jax.models.configs import LlamaConfig, Runtime
from cxrllava_jax.models.attention import CausalMask, attend
from cxrllava_jax.models.layers import LLAMA_STACK, apply_layers, dense, dtype_of, dtypes, partitioned
from cxrllava_jax.models.rope import inverse_frequencies


class RMSNorm(nn.Module):
    eps: float
    runtime: Runtime

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", partitioned(nn.initializers.ones_init(), "embed"), (x.shape[-1],),
                            dtype_of(self.runtime.param_dtype))
        x32 = x.astype(jnp.float32)  # normalise in fp32, as transformers does
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return weight.astype(dtype_of(self.runtime.dtype)) * x32.astype(dtype_of(self.runtime.dtype))


def rotary_embedding(x, positions, inv_freq):
    """RoPE in the Hugging Face (rotate-half) layout. x: [batch, length, heads, head_dim]; positions: [batch, length];
    inv_freq: [head_dim / 2] (`models.rope`)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, length, head_dim / 2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * jnp.cos(angles).astype(x.dtype) + rotated * jnp.sin(angles).astype(x.dtype)).astype(x.dtype)


def attention_mask(query_slots, kv_valid):
    """Causal mask over cache slots: query at slot t sees valid keys at slots <= t.

    query_slots: [batch, q_len] int; kv_valid: [batch, kv_len] bool. Returns [batch, 1, q_len, kv_len].
    """
    slots = jnp.arange(kv_valid.shape[1])
    causal = slots[None, None, :] <= query_slots[:, :, None]
    return (causal & kv_valid[:, None, :])[:, None]


def real_positions(valid):
    """Positions counting only a row's real tokens (padding left or right changes nothing). valid: [batch, length]."""
    return jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)


class DecoderLayer(nn.Module):
    """One block; carries `(x, cache)` so that the cache is updated in place, with or without `nn.scan`."""

    config: LlamaConfig
    runtime: Runtime

    @nn.compact
    def __call__(self, carry, layer, positions, mask, cache_index):
        cfg, rt = self.config, self.runtime
        x, cache = carry
        kw = dict(use_bias=False, **dtypes(rt))
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        h = RMSNorm(cfg.rms_norm_eps, rt, name="input_layernorm")(x)
        q = dense((cfg.num_heads, cfg.resolved_head_dim), (("embed",), ("heads", "kv")), name="q_proj", **kw)(h)
        k = dense((cfg.num_kv_heads, cfg.resolved_head_dim), (("embed",), ("kv_heads", "kv")), name="k_proj", **kw)(h)
        v = dense((cfg.num_kv_heads, cfg.resolved_head_dim), (("embed",), ("kv_heads", "kv")), name="v_proj", **kw)(h)
        inv_freq = inverse_frequencies(cfg, positions)
        q = rotary_embedding(q, positions, inv_freq)
        k = rotary_embedding(k, positions, inv_freq)
        if cache is None:
            out = attend(q, k, v, mask, kernel=rt.attention)
        else:
            cache, k, v = write_and_read(cache, layer, k, v, cache_index, mask.shape[-1])
            out = cached_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, rt.attention)
        x = x + dense(cfg.hidden_size, (("heads", "kv"), ("embed",)), in_axis=(-2, -1), name="o_proj", **kw)(out)
        h = RMSNorm(cfg.rms_norm_eps, rt, name="post_attention_layernorm")(x)
        gate = dense(cfg.intermediate_size, (("embed",), ("mlp",)), name="gate_proj", **kw)(h)
        up = dense(cfg.intermediate_size, (("embed",), ("mlp",)), name="up_proj", **kw)(h)
        hidden = checkpoint_name(nn.silu(gate) * up, "mlp_hidden")
        x = x + dense(cfg.hidden_size, (("mlp",), ("embed",)), name="down_proj", **kw)(hidden)
        return (x, cache), None


def write_and_read(cache, layer, k, v, cache_index, read_length: int):
    """Writes this layer's new k, v [batch, length, kv_heads, head_dim] at slot `cache_index` of the cache, in
    place; returns the cache and the layer's first `read_length` slots [batch, kv_heads, read, head_dim].

    The cache is stacked (one [layers, ...] array) or, for unrolled layers (`layer` a Python int), one
    [batch, kv_heads, slots, head_dim] array per layer (`init_cache`), which a step that reads every slot reads
    where it lies; a stacked cache's layer is sliced out first, a copy per layer and token.
    `cache_index` is one first slot for every row, or a first slot per row [batch]: rows of a running batch
    write at their own slots (`inference.engine`)."""
    new = {"k": k, "v": v}
    updated, read = {}, {}
    for name, whole in cache.items():
        per_layer = isinstance(whole, tuple)
        array = whole[layer] if per_layer else whole
        at = () if per_layer else (layer,)  # the index of the layer's [batch, kv_heads, slots, head_dim]
        if jnp.ndim(cache_index) == 1 and array.shape[-4] == 1:  # one row: its slot is the batch's (no scatter)
            cache_index = cache_index[0]
        if jnp.ndim(cache_index) == 1 and new[name].shape[1] == 1:
            rows = jnp.arange(array.shape[-4])
            array = array.at[(*at, rows, slice(None), cache_index)].set(new[name][:, 0].astype(array.dtype))
        elif jnp.ndim(cache_index) == 1:  # a block per row, each at its own first slot
            rows = jnp.arange(array.shape[-4])[:, None]
            slots = cache_index[:, None] + jnp.arange(new[name].shape[1])
            array = array.at[(*at, rows, slice(None), slots)].set(new[name].astype(array.dtype))
        else:
            slots = new[name].astype(array.dtype).swapaxes(1, 2)  # [batch, kv_heads, length, head_dim]
            array = jax.lax.dynamic_update_slice(array, slots.reshape((1,) * len(at) + slots.shape),
                                                 (*at, 0, 0, cache_index, 0))
        updated[name] = whole[:layer] + (array,) + whole[layer + 1:] if per_layer else array
        size = (*array.shape[-4:-2], read_length, array.shape[-1])
        read[name] = jax.lax.dynamic_slice(array, (*at, 0, 0, 0, 0), (1,) * len(at) + size).reshape(size)
    return updated, read["k"], read["v"]


def cached_attention(q, k, v, mask, kernel: str = "xla"):
    """q [batch, q_len, heads, head_dim] against cache slots k, v [batch, kv_heads, slots, head_dim].

    A decode step (one query) contracts straight against the cache's layout, one matrix-vector product per
    (row, kv head), scores and softmax in float32 as `jax.nn.dot_product_attention` does; longer queries (the
    prompt) go through `attend` with the configured kernel.
    """
    if q.shape[1] > 1:
        return attend(q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask, kernel=kernel)
    batch, _, heads, head_dim = q.shape
    groups = heads // k.shape[1]
    q = q.reshape(batch, k.shape[1], groups, head_dim)
    scores = jnp.einsum("bkgd,bktd->bkgt", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(head_dim)
    scores = jnp.where(mask[:, :, 0, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgt,bktd->bkgd", probs, v).reshape(batch, 1, heads, head_dim)


class DecoderStack(nn.Module):
    config: LlamaConfig
    runtime: Runtime

    @nn.compact
    def __call__(self, x, cache, positions, mask, cache_index):
        layers = np.arange(self.config.num_layers)  # unrolled, a layer's index stays a Python int: its cache array
        (x, cache), _ = apply_layers(DecoderLayer, dict(config=self.config, runtime=self.runtime), (x, cache), layers,
                                     positions, mask, cache_index, num_layers=self.config.num_layers,
                                     scan=self.runtime.scan, remat_policy=self.runtime.remat_policy, name=LLAMA_STACK)
        return x, cache


class Llama(nn.Module):
    """`LlamaForCausalLM`: embed -> decoder layers -> RMSNorm -> lm_head (or the embedding table, when tied)."""

    config: LlamaConfig
    runtime: Runtime = Runtime()

    def setup(self):
        cfg, rt = self.config, self.runtime
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, **dtypes(rt),
            embedding_init=partitioned(nn.initializers.normal(0.02), "vocab", "embed"))
        self.layers = DecoderStack(cfg, rt)
        self.norm = RMSNorm(cfg.rms_norm_eps, rt)
        if not cfg.tie_word_embeddings:
            self.lm_head = dense(cfg.vocab_size, (("embed",), ("vocab",)), use_bias=False, **dtypes(rt),
                                 name="lm_head", kernel_init=nn.initializers.normal(0.02))

    def embed(self, tokens):
        return nn.with_logical_constraint(self.embed_tokens(tokens), ("batch", "length", "embed"))

    def cached_forward(self, embeds, positions, mask, cache=None, cache_index=0):
        """embeds: [batch, length, hidden]; mask: [batch, 1, length, kv_len]. Returns (logits fp32, {"cache"}).

        With a cache, the new keys/values go to slots `cache_index...` and attention reads the first kv_len slots.
        """
        x, cache = self.layers(embeds, cache, positions, mask, cache_index)
        return self.logits(x), {"cache": cache}

    def hidden_states(self, embeds, positions, mask):
        """The last decoder layer's output, before the final norm: [batch, length, hidden]."""
        x, _ = self.layers(embeds, None, positions, mask, 0)
        return x

    def logits(self, hidden):
        """Final norm and output head (the embedding table, when tied) of any positions' hidden states, in fp32."""
        h = self.norm(hidden)
        logits = self.embed_tokens.attend(h) if self.config.tie_word_embeddings else self.lm_head(h)
        return logits.astype(jnp.float32)

    def extend(self, tokens, features, positions, mask, cache, starts, last):
        """`extend_embedded` of token ids; `features` is None (one signature with `CXRLLaVAModel.extend`)."""
        if features is not None:
            raise ValueError("the language model takes no images")
        return self.extend_embedded(self.embed(tokens), positions, mask, cache, starts, last)

    def extend_embedded(self, embeds, positions, mask, cache, starts, last):
        """A block of each row's prompt [batch, length, hidden] into the cache at slots starts.. (one first slot,
        or one per row [batch]) -> (the logits at block index `last` [batch] of each row [batch, vocab] fp32,
        {"cache"}): rows end their prompts at different places of a right-padded block."""
        x, cache = self.layers(embeds, cache, positions, mask, starts)
        hidden = jnp.take_along_axis(x, last[:, None, None], axis=1)
        return self.logits(hidden)[:, 0], {"cache": cache}

    def step(self, tokens, positions, mask, cache, slot):
        """One token per row [batch, 1] at cache slot `slot` -> (logits [batch, vocab] fp32, {"cache"})."""
        logits, aux = self.cached_forward(self.embed(tokens), positions, mask, cache, slot)
        return logits[:, 0], aux

    def __call__(self, tokens, valid=None):
        """Full causal forward over [batch, length] tokens; `valid` marks non-padding (left or right).
        Returns (logits [batch, length, vocab] fp32, {})."""
        valid = jnp.ones(tokens.shape, bool) if valid is None else valid.astype(bool)
        return self.logits(self.hidden_states(self.embed(tokens), real_positions(valid), CausalMask(valid))), {}


def init_cache(config: LlamaConfig, batch: int, max_length: int, dtype=jnp.bfloat16, *, per_layer: bool = False):
    """{"k", "v"}: one stacked [layers, batch, kv_heads, max_length, head_dim] array each or, with `per_layer`
    (unrolled layers only), a tuple of one [batch, kv_heads, max_length, head_dim] array per layer, which a
    decode step that attends over every slot reads where it lies (`write_and_read`). Either way the rows are
    axis -4 and the slots axis -2."""
    shape = (batch, config.num_kv_heads, max_length, config.resolved_head_dim)
    if per_layer:
        return {name: tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)) for name in ("k", "v")}
    return {name: jnp.zeros((config.num_layers, *shape), dtype) for name in ("k", "v")}
