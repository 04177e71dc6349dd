"""CXR-LLaVA: image encoder -> projector -> image tokens spliced into LLaMA's input embeddings.

Tokenisation expands the `<image>` placeholder into `num_image_tokens` copies of `image_token_id`, so
every batch row holds its image positions at static offsets of a fixed-length sequence; the merge is
a gather, not a Python loop over the batch. This reproduces the release's sequence exactly:
text before `<image>`, then `grid*grid` projected patch tokens, then the rest of the text.
"""

import flax.linen as nn
import jax.numpy as jnp

from cxrllava_jax.models.configs import CXRLLaVAConfig, Runtime
from cxrllava_jax.models.layers import dense, dtypes
from cxrllava_jax.models.llama import Llama, prompt_positions_and_mask
from cxrllava_jax.models.vit import VisionTransformer


class Projector(nn.Module):
    """Vision width -> LLM width: one linear layer (release) or LLaVA-1.5's two-layer GELU MLP."""

    kind: str
    features: int
    runtime: Runtime = Runtime()

    @nn.compact
    def __call__(self, x):
        kw = dict(use_bias=True, **dtypes(self.runtime))
        if self.kind == "linear":
            return dense(self.features, (("mlp",), ("embed",)), name="linear", **kw)(x)
        if self.kind == "mlp2x_gelu":
            x = dense(self.features, (("mlp",), ("embed",)), name="fc1", **kw)(x)
            return dense(self.features, (("mlp",), ("embed",)), name="fc2", **kw)(nn.gelu(x, approximate=False))
        raise ValueError(f"projector must be 'linear' or 'mlp2x_gelu', got {self.kind!r}")


def splice_image_features(text_embeds, image_features, is_image):
    """Puts image feature i at the i-th image position of each row.

    text_embeds: [batch, length, hidden]; image_features: [batch, num_image_tokens, hidden];
    is_image: [batch, length] bool with exactly num_image_tokens (or zero) True entries per row.
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
        """[batch, H, W, 1] normalised -> [batch, num_image_tokens, llm hidden]."""
        # Tower outputs are pinned to batch sharding. Left to sharding propagation, XLA (jax 0.10.2) compiled
        # ViT -> projector on a (data, fsdp, tensor) mesh into a program that returned wrong rows.
        features = self.projector(self.img(images)["tokens"])
        return nn.with_logical_constraint(features, ("batch", "length", "embed"))

    def embed(self, tokens, image_features):
        """Token embeddings with the image positions (`image_token_id`) replaced by projected image tokens."""
        is_image = tokens == self.config.image_token_id
        text = self.llm.embed(jnp.where(is_image, 0, tokens))
        return splice_image_features(text, image_features, is_image)

    def decode(self, embeds, positions, mask, cache=None, cache_index=0):
        return self.llm.decode(embeds, positions, mask, cache, cache_index)

    def __call__(self, images, tokens, valid=None):
        """Full forward: images [batch, H, W, 1], tokens [batch, length] with expanded image positions.

        Returns next-token logits [batch, length, vocab] (fp32).
        """
        valid = jnp.ones(tokens.shape, bool) if valid is None else valid.astype(bool)
        embeds = self.embed(tokens, self.encode_images(images))
        positions, mask = prompt_positions_and_mask(valid)
        logits, _ = self.decode(embeds, positions, mask)
        return logits
