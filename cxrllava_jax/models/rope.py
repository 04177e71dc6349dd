"""Rotary position embedding (RoPE) frequencies for the LLaMA family's variants, as transformers computes them.

`rope_type` 'default' (LLaMA-2), 'linear' (position interpolation: every frequency / factor), 'dynamic'
(NTK-aware: the base grows once a sequence passes max_position_embeddings) and 'llama3' (Llama 3.1: low
frequencies / factor, high ones kept, a smooth ramp between). Frequencies are float32, as transformers keeps them.
"""

import math

import jax.numpy as jnp

from cxrllava_jax.models.configs import LlamaConfig

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


def inverse_frequencies(cfg: LlamaConfig, positions) -> jnp.ndarray:
    """[head_dim / 2] float32 for a forward over `positions` (only 'dynamic' looks at them)."""
    scaling, dim = cfg.rope_scaling, cfg.resolved_head_dim
    base = jnp.float32(cfg.rope_theta)
    if scaling.rope_type == "dynamic":
        # transformers recomputes the base from the longest sequence a forward call sees (its largest position).
        context = cfg.max_position_embeddings
        length = jnp.maximum(jnp.max(positions) + 1, context).astype(jnp.float32)
        base = base * ((scaling.factor * length / context) - (scaling.factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        return _llama3(inv_freq, scaling)
    return inv_freq


def _llama3(inv_freq, scaling):
    old_context = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context / scaling.low_freq_factor
    high_freq_wavelen = old_context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return jnp.where(medium, smoothed, scaled)
