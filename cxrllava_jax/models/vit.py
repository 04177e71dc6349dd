"""The image encoder: a ViT with open_clip `VisionTransformer` semantics (REFERENCE.md), grayscale input.

Returns the contrastive embedding (`pooled @ proj`), with the pooled feature and the patch tokens the language
model sees as auxiliaries. `ViTClassifier` adds the stage 1A normal/abnormal head on the pooled feature.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from cxrllava_jax.models.configs import Runtime, VisionConfig
from cxrllava_jax.models.attention import attend
from cxrllava_jax.models.layers import VIT_STACK, apply_layers, dense, dtype_of, dtypes, layer_norm, partitioned


class SelfAttention(nn.Module):
    """Unmasked multi-head self-attention with biases (torch.nn.MultiheadAttention semantics)."""

    width: int
    heads: int
    runtime: Runtime

    @nn.compact
    def __call__(self, x, mask=None):
        head_dim = self.width // self.heads
        kw = dict(use_bias=True, **dtypes(self.runtime))
        q, k, v = (dense((self.heads, head_dim), (("embed",), ("heads", "kv")), name=n, **kw)(x) for n in "qkv")
        out = attend(q, k, v, mask, kernel=self.runtime.attention)
        return dense(self.width, (("heads", "kv"), ("embed",)), in_axis=(-2, -1), name="out", **kw)(out)


class ResidualBlock(nn.Module):
    """open_clip `ResidualAttentionBlock`: pre-norm attention and GELU MLP, optional layer scale."""

    config: VisionConfig
    runtime: Runtime

    @nn.compact
    def __call__(self, x, _, *__):
        cfg, rt = self.config, self.runtime
        kw = dict(use_bias=True, **dtypes(rt))
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        h = SelfAttention(cfg.width, cfg.heads, rt, name="attn")(layer_norm(cfg.layer_norm_eps, rt, "ln_1")(x))
        x = x + self._layer_scale("ls_1", h)
        h = layer_norm(cfg.layer_norm_eps, rt, "ln_2")(x)
        h = dense(cfg.mlp_dim, (("embed",), ("mlp",)), name="c_fc", **kw)(h)
        h = checkpoint_name(nn.gelu(h, approximate=False), "mlp_hidden")
        h = dense(cfg.width, (("mlp",), ("embed",)), name="c_proj", **kw)(h)
        return x + self._layer_scale("ls_2", h), None

    def _layer_scale(self, name, h):
        if self.config.ls_init_value is None:
            return h
        init = nn.initializers.constant(self.config.ls_init_value)
        gamma = self.param(name, partitioned(init, "embed"), (self.config.width,), dtype_of(self.runtime.param_dtype))
        return h * gamma


def keep_random_patches(tokens, prob: float, rng):
    """open_clip PatchDropout during training: keep a random subset of patch tokens (class token kept)."""
    cls, patches = tokens[:, :1], tokens[:, 1:]
    batch, num = patches.shape[:2]
    keep = max(1, int(num * (1.0 - prob)))
    order = jnp.argsort(jax.random.normal(rng, (batch, num)), axis=-1)[:, :keep]
    return jnp.concatenate([cls, jnp.take_along_axis(patches, order[..., None], axis=1)], axis=1)


class VisionTransformer(nn.Module):
    config: VisionConfig
    runtime: Runtime = Runtime()

    @nn.compact
    def __call__(self, images, *, train: bool = False):
        """images: [batch, H, W, channels] normalised. Returns (embedding, {"pooled", "tokens"})."""
        cfg, rt = self.config, self.runtime
        dtype, param_dtype = dtype_of(rt.dtype), dtype_of(rt.param_dtype)
        x = nn.Conv(
            cfg.width, (cfg.patch_size, cfg.patch_size), strides=(cfg.patch_size, cfg.patch_size), padding="VALID",
            use_bias=False, dtype=dtype, param_dtype=param_dtype, name="conv1",
            kernel_init=partitioned(nn.initializers.lecun_normal(), "patch_h", "patch_w", "channels", "embed"),
        )(images.astype(dtype))
        x = x.reshape(x.shape[0], -1, cfg.width)  # row-major over the grid, as torch's flatten(2)
        scale = cfg.width**-0.5
        cls = self.param("class_embedding", partitioned(nn.initializers.normal(scale), "embed"), (cfg.width,),
                         param_dtype)
        pos = self.param("positional_embedding", partitioned(nn.initializers.normal(scale), "length", "embed"),
                         (cfg.grid**2 + 1, cfg.width), param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (x.shape[0], 1, cfg.width)), x], axis=1)
        x = x + pos.astype(dtype)
        if train and cfg.patch_dropout > 0:
            x = keep_random_patches(x, cfg.patch_dropout, self.make_rng("dropout"))
        if not cfg.no_ln_pre:
            x = layer_norm(cfg.layer_norm_eps, rt, "ln_pre")(x)
        x, _ = apply_layers(ResidualBlock, dict(config=cfg, runtime=rt), x, None, num_layers=cfg.layers,
                            scan=rt.scan, remat_policy=rt.remat_policy, name=VIT_STACK)
        ln_post = layer_norm(cfg.layer_norm_eps, rt, "ln_post")
        if not cfg.final_ln_after_pool:
            x = ln_post(x)
        pooled = x[:, 0] if cfg.pool_type == "tok" else x[:, 1:].mean(axis=1)
        if cfg.final_ln_after_pool:
            pooled = ln_post(pooled)
        proj = self.param("proj", partitioned(nn.initializers.normal(scale), "embed", "clip"),
                          (cfg.width, cfg.embed_dim), param_dtype)
        tokens = nn.with_logical_constraint(x[:, 1:], ("batch", "length", "embed"))
        return pooled @ proj.astype(dtype), {"pooled": pooled, "tokens": tokens}


class ViTClassifier(nn.Module):
    """Stage 1A: the image encoder plus a linear normal/abnormal head on the pooled feature."""

    config: VisionConfig
    runtime: Runtime = Runtime()

    @nn.compact
    def __call__(self, images, *, train: bool = False):
        """Returns (abnormality logits [batch] fp32, {"probability", "embedding", "pooled", "tokens"})."""
        embedding, features = VisionTransformer(self.config, self.runtime, name="img")(images, train=train)
        head = dense(1, (("embed",), ("classes",)), use_bias=True, dtype=jnp.float32,
                     param_dtype=dtype_of(self.runtime.param_dtype), name="head",
                     kernel_init=nn.initializers.zeros_init())
        logits = head(features["pooled"].astype(jnp.float32))[:, 0]
        return logits, {"probability": jax.nn.sigmoid(logits), "embedding": embedding, **features}


def resample_position_embedding(posemb, new_grid: int):
    """Bilinear resampling of a [1 + grid*grid, width] table to a new grid; the class slot is kept."""
    cls, grid_part = posemb[:1], posemb[1:]
    old_grid = int(round(grid_part.shape[0] ** 0.5))
    if old_grid * old_grid != grid_part.shape[0]:
        raise ValueError(f"position table of {grid_part.shape[0]} patch slots is not a square grid")
    grid_part = grid_part.reshape(old_grid, old_grid, -1)
    resized = jax.image.resize(grid_part, (new_grid, new_grid, grid_part.shape[-1]), method="bilinear")
    return jnp.concatenate([cls, resized.reshape(new_grid * new_grid, -1)], axis=0)
