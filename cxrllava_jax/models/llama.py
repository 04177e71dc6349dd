"""The language model: LLaMA-2 (Hugging Face `LlamaForCausalLM` semantics) with a preallocated KV cache.

The cache is an explicit pytree `{"k", "v"}: [layers, batch, max_length, kv_heads, head_dim]` passed in
and returned, so prefill and decode are pure functions that `jit` and `lax.while_loop` can carry.
New keys/values are written at `cache_index`; which slots a query may see is the caller's mask.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxrllava_jax.models.configs import LlamaConfig, Runtime
from cxrllava_jax.models.layers import LLAMA_STACK, apply_layers, attention, dense, dtype_of, dtypes, partitioned


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


def rotary_embedding(x, positions, theta: float):
    """RoPE in the Hugging Face (rotate-half) layout. x: [batch, length, heads, head_dim]; positions: [batch, length]."""
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
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


def prompt_positions_and_mask(valid, kv_valid=None):
    """Positions counting only a row's real tokens (padding left or right changes nothing) and the causal mask
    of a whole prompt at slots 0..length-1. valid: [batch, length] bool; kv_valid (default `valid`): the cache's."""
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    slots = jnp.broadcast_to(jnp.arange(valid.shape[1]), valid.shape)
    return positions, attention_mask(slots, valid if kv_valid is None else kv_valid)


class DecoderLayer(nn.Module):
    config: LlamaConfig
    runtime: Runtime

    @nn.compact
    def __call__(self, x, layer_cache, positions, mask, cache_index):
        cfg, rt = self.config, self.runtime
        kw = dict(use_bias=False, **dtypes(rt))
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        h = RMSNorm(cfg.rms_norm_eps, rt, name="input_layernorm")(x)
        q = dense((cfg.num_heads, cfg.kv_dim), (("embed",), ("heads", "kv")), name="q_proj", **kw)(h)
        k = dense((cfg.num_kv_heads, cfg.kv_dim), (("embed",), ("kv_heads", "kv")), name="k_proj", **kw)(h)
        v = dense((cfg.num_kv_heads, cfg.kv_dim), (("embed",), ("kv_heads", "kv")), name="v_proj", **kw)(h)
        q = rotary_embedding(q, positions, cfg.rope_theta)
        k = rotary_embedding(k, positions, cfg.rope_theta)
        if layer_cache is not None:
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), start)
            v = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), start)
            layer_cache = {"k": k, "v": v}
        out = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, implementation=rt.attention_impl)
        x = x + dense(cfg.hidden_size, (("heads", "kv"), ("embed",)), in_axis=(-2, -1), name="o_proj", **kw)(out)
        h = RMSNorm(cfg.rms_norm_eps, rt, name="post_attention_layernorm")(x)
        gate = dense(cfg.intermediate_size, (("embed",), ("mlp",)), name="gate_proj", **kw)(h)
        up = dense(cfg.intermediate_size, (("embed",), ("mlp",)), name="up_proj", **kw)(h)
        x = x + dense(cfg.hidden_size, (("mlp",), ("embed",)), name="down_proj", **kw)(nn.silu(gate) * up)
        return x, layer_cache


class DecoderStack(nn.Module):
    config: LlamaConfig
    runtime: Runtime

    @nn.compact
    def __call__(self, x, cache, positions, mask, cache_index):
        return apply_layers(DecoderLayer, dict(config=self.config, runtime=self.runtime), x, cache, positions, mask,
                            cache_index, num_layers=self.config.num_layers, scan=self.runtime.scan,
                            remat_policy=self.runtime.remat_policy, name=LLAMA_STACK)


class Llama(nn.Module):
    """`LlamaForCausalLM`: embed -> decoder layers -> RMSNorm -> untied lm_head."""

    config: LlamaConfig
    runtime: Runtime = Runtime()

    def setup(self):
        cfg, rt = self.config, self.runtime
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, **dtypes(rt),
            embedding_init=partitioned(nn.initializers.normal(0.02), "vocab", "embed"))
        self.layers = DecoderStack(cfg, rt)
        self.norm = RMSNorm(cfg.rms_norm_eps, rt)
        self.lm_head = dense(cfg.vocab_size, (("embed",), ("vocab",)), use_bias=False, **dtypes(rt), name="lm_head",
                             kernel_init=nn.initializers.normal(0.02))

    def embed(self, tokens):
        return nn.with_logical_constraint(self.embed_tokens(tokens), ("batch", "length", "embed"))

    def decode(self, embeds, positions, mask, cache=None, cache_index=0):
        """embeds: [batch, length, hidden]; mask: [batch, 1, length, kv_len]. Returns (logits fp32, cache)."""
        x, cache = self.layers(embeds, cache, positions, mask, cache_index)
        logits = self.lm_head(self.norm(x))
        return logits.astype(jnp.float32), cache

    def __call__(self, tokens, valid=None):
        """Full causal forward over [batch, length] tokens; `valid` marks non-padding (left or right)."""
        valid = jnp.ones(tokens.shape, bool) if valid is None else valid.astype(bool)
        positions, mask = prompt_positions_and_mask(valid)
        logits, _ = self.decode(self.embed(tokens), positions, mask)
        return logits


def init_cache(config: LlamaConfig, batch: int, max_length: int, dtype=jnp.bfloat16):
    shape = (config.num_layers, batch, max_length, config.num_kv_heads, config.kv_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
