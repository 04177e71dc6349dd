"""CXR-LLaVA: image encoder -> projector -> image tokens spliced into LLaMA's input embeddings.

Tokenisation expands each `<image>` placeholder into `num_image_tokens` copies of `image_token_id`, so
every batch row holds its image positions at static offsets of a fixed-length sequence; the merge is
a gather, not a Python loop over the batch. This reproduces the release's sequence exactly:
text before `<image>`, then `grid*grid` projected patch tokens, then the rest of the text.

A row may carry several images (a study: frontal, lateral, the prior): images [batch, slots, H, W, 1] are encoded
as one [batch * slots] ViT batch and their tokens laid end to end, so the k-th image position of a row takes the
k-th token of its images in slot order. A row with fewer `<image>` places than slots never reads the trailing
slots (zeros), so the token ids are the mask.
"""

import flax.linen as nn
import jax.numpy as jnp

from cxrllava_jax.errors import ConfigError
from cxrllava_jax.models.configs import CXRLLaVAConfig, Runtime
from cxrllava_jax.models.attention import CausalMask
from cxrllava_jax.models.layers import dense, dtypes
from cxrllava_jax.models.llama import Llama, real_positions
from cxrllava_jax.models.vit import VisionTransformer


class Projector(nn.Module):
    """Vision width -> LLM width: one linear layer (release) or LLaVA-1.5's two-layer GELU MLP."""

    kind: str
    features: int
    runtime: Runtime = Runtime()

    @nn.compact
    def __call__(self, x):
        """Returns (x in the LLM's width, {})."""
        kw = dict(use_bias=True, **dtypes(self.runtime))
        if self.kind == "linear":
            return dense(self.features, (("mlp",), ("embed",)), name="linear", **kw)(x), {}
        if self.kind == "mlp2x_gelu":
            x = dense(self.features, (("mlp",), ("embed",)), name="fc1", **kw)(x)
            return dense(self.features, (("mlp",), ("embed",)), name="fc2", **kw)(nn.gelu(x, approximate=False)), {}
        raise ConfigError(f"projector must be 'linear' or 'mlp2x_gelu', got {self.kind!r}")


def pool_tokens(tokens, pool: int):
    """ViT patch tokens [n, grid*grid, width] averaged over pool x pool patches -> [n, (grid/pool)^2, width], in the
    same row-major order; pool 1 returns them untouched."""
    if pool == 1:
        return tokens
    n, count, width = tokens.shape
    grid = round(count ** 0.5)
    blocks = tokens.reshape(n, grid // pool, pool, grid // pool, pool, width)
    return blocks.mean(axis=(2, 4), dtype=jnp.float32).astype(tokens.dtype).reshape(n, -1, width)


def splice_image_features(text_embeds, image_features, is_image):
    """Puts image feature i at the i-th image position of each row.

    text_embeds: [batch, length, hidden]; image_features: [batch, slots * num_image_tokens, hidden];
    is_image: [batch, length] bool with at most slots * num_image_tokens True entries per row.
    """
    order = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, image_features.shape[1] - 1)
    gathered = jnp.take_along_axis(image_features, order[..., None], axis=1)
    return jnp.where(is_image[..., None], gathered.astype(text_embeds.dtype), text_embeds)


class CXRLLaVAModel(nn.Module):
    """The Flax module (the Python API around a trained one is `inference.api.CXRLLaVA`)."""

    config: CXRLLaVAConfig
    runtime: Runtime = Runtime()

    def setup(self):
        cfg = self.config
        self.img = VisionTransformer(cfg.vision, self.runtime)
        self.projector = Projector(cfg.projector, cfg.llama.hidden_size, self.runtime)
        self.llm = Llama(cfg.llama, self.runtime)

    def encode_images(self, images):
        """[batch, H, W, 1] or [batch, slots, H, W, 1] normalised -> [batch, slots * num_image_tokens, llm hidden]."""
        batch = images.shape[0]
        images = images.reshape((-1, *images.shape[-3:]))
        # Tower outputs are pinned to batch sharding. Left to sharding propagation, XLA (jax 0.10.2) compiled
        # ViT -> projector on a (data, fsdp, tensor) mesh into a program that returned wrong rows.
        _, vision = self.img(images)
        features, _ = self.projector(pool_tokens(vision["tokens"], self.config.projector_pool))
        features = features.reshape(batch, -1, features.shape[-1])
        return nn.with_logical_constraint(features, ("batch", "length", "embed"))

    def embed(self, tokens, image_features):
        """Token embeddings with the image positions (`image_token_id`) replaced by projected image tokens."""
        is_image = tokens == self.config.image_token_id
        text = self.llm.embed(jnp.where(is_image, 0, tokens))
        return splice_image_features(text, image_features, is_image)

    def cached_forward(self, embeds, positions, mask, cache=None, cache_index=0):
        return self.llm.cached_forward(embeds, positions, mask, cache, cache_index)

    def image_features(self, images):
        """(`encode_images`, {}): the engine encodes images apart from the prompts, so that it can keep them."""
        return self.encode_images(images), {}

    def extend(self, tokens, features, positions, mask, cache, starts, last):
        """`Llama.extend_embedded` of a prompt block whose image places hold `features` [batch, places, hidden]
        (None: the block holds no image places)."""
        embeds = self.llm.embed(tokens) if features is None else self.embed(tokens, features)
        return self.llm.extend_embedded(embeds, positions, mask, cache, starts, last)

    def step(self, tokens, positions, mask, cache, slot):
        return self.llm.step(tokens, positions, mask, cache, slot)

    def hidden_states(self, images, tokens, valid=None, right_padded: bool = False):
        """The LLM's last hidden states [batch, length, hidden] for images [batch, H, W, 1] and tokens [batch,
        length] with expanded image positions; `right_padded` promises real tokens first (training batches)."""
        valid = jnp.ones(tokens.shape, bool) if valid is None else valid.astype(bool)
        embeds = self.embed(tokens, self.encode_images(images))
        return self.llm.hidden_states(embeds, real_positions(valid), CausalMask(valid, right_padded))

    def __call__(self, images, tokens, valid=None):
        """Full forward. Returns (next-token logits [batch, length, vocab] fp32, {})."""
        return self.llm.logits(self.hidden_states(images, tokens, valid)), {}

    def logits_at(self, images, tokens, valid, at):
        """(Logits [batch, n, vocab] fp32, {}) at the positions `at` [batch, n] of right-padded rows only: training
        projects onto the vocabulary just the positions it scores, not the ~1,024 image positions."""
        hidden = self.hidden_states(images, tokens, valid, right_padded=True)
        return self.llm.logits(jnp.take_along_axis(hidden, at[..., None], axis=1)), {}
