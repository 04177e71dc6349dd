"""Stage 1B: the image tower against a BERT text tower, CLIP-style.

L2-normalised embeddings, a learnable temperature (stored as log of the logit scale, as open_clip does)
and the symmetric cross-entropy over the batch.
"""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import optax

from cxrllava_jax.models.bert import TextEncoder
from cxrllava_jax.models.configs import ContrastiveConfig, Runtime
from cxrllava_jax.models.vit import VisionTransformer


def l2_normalize(x, eps=1e-6):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class ContrastiveModel(nn.Module):
    config: ContrastiveConfig
    runtime: Runtime = Runtime()

    @nn.compact
    def __call__(self, images, input_ids, attention_mask, *, train: bool = False):
        """Returns (logits per image [images, texts] fp32, {"image_embedding", "text_embedding", "logit_scale"}),
        the embeddings L2-normalised and fp32."""
        cfg = self.config
        img, _ = VisionTransformer(cfg.vision, self.runtime, name="img")(images, train=train)
        txt, _ = TextEncoder(cfg.text, cfg.vision.embed_dim, cfg.text_pooling, self.runtime, name="txt")(
            input_ids, attention_mask)
        log_scale = self.param("logit_scale", nn.initializers.constant(np.log(1 / cfg.init_temperature)), ())
        image_emb, text_emb = l2_normalize(img.astype(jnp.float32)), l2_normalize(txt.astype(jnp.float32))
        logit_scale = jnp.exp(log_scale)
        logits = logit_scale * image_emb @ text_emb.T
        return logits, {"image_embedding": image_emb, "text_embedding": text_emb, "logit_scale": logit_scale}


def contrastive_loss(logits):
    """Symmetric InfoNCE over logits per image [batch, batch]: the i-th image matches the i-th text."""
    labels = jnp.arange(logits.shape[0])
    per_image = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    per_text = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
    return (per_image.mean() + per_text.mean()) / 2
