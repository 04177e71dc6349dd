"""The stage 1B text tower: BERT with the Hugging Face module names, so CXR-BERT or any BERT loads.

`TextEncoder` pools BERT's output (class token or masked mean) and projects it into the contrastive space.
"""

import flax.linen as nn
import jax.numpy as jnp

from cxrllava_jax.models.configs import BertConfig, Runtime
from cxrllava_jax.models.attention import KeyMask, attend
from cxrllava_jax.models.layers import BERT_STACK, apply_layers, dense, dtypes, layer_norm, partitioned


class BertLayer(nn.Module):
    """Post-norm encoder layer: attention -> add & norm -> GELU MLP -> add & norm."""

    config: BertConfig
    runtime: Runtime

    @nn.compact
    def __call__(self, x, _, mask):
        cfg, rt = self.config, self.runtime
        head_dim = cfg.hidden_size // cfg.num_heads
        kw = dict(use_bias=True, **dtypes(rt))
        q, k, v = (dense((cfg.num_heads, head_dim), (("embed",), ("heads", "kv")), name=n, **kw)(x)
                   for n in ("query", "key", "value"))
        h = attend(q, k, v, mask, kernel=rt.attention)
        h = dense(cfg.hidden_size, (("heads", "kv"), ("embed",)), in_axis=(-2, -1), name="attention_output", **kw)(h)
        x = layer_norm(cfg.layer_norm_eps, rt, "attention_LayerNorm")(x + h)
        h = dense(cfg.intermediate_size, (("embed",), ("mlp",)), name="intermediate", **kw)(x)
        h = dense(cfg.hidden_size, (("mlp",), ("embed",)), name="output", **kw)(nn.gelu(h, approximate=False))
        return layer_norm(cfg.layer_norm_eps, rt, "output_LayerNorm")(x + h), None


class Bert(nn.Module):
    config: BertConfig
    runtime: Runtime = Runtime()

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None):
        """input_ids, attention_mask: [batch, length], padded on the right as BERT tokenizers pad (real tokens
        first). Returns (last hidden states, {"pooler_output"})."""
        cfg, rt = self.config, self.runtime

        def embed(num, name, axis_name):
            init = partitioned(nn.initializers.normal(0.02), axis_name, "embed")
            return nn.Embed(num, cfg.hidden_size, name=name, embedding_init=init, **dtypes(rt))

        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        positions = jnp.arange(input_ids.shape[1])[None]
        x = (embed(cfg.vocab_size, "word_embeddings", "vocab")(input_ids)
             + embed(cfg.type_vocab_size, "token_type_embeddings", "classes")(token_type_ids)
             + embed(cfg.max_position_embeddings, "position_embeddings", "length")(positions))
        x = layer_norm(cfg.layer_norm_eps, rt, "embeddings_LayerNorm")(x)
        mask = KeyMask(attention_mask.astype(bool), right_padded=True)
        x, _ = apply_layers(BertLayer, dict(config=cfg, runtime=rt), x, None, mask, num_layers=cfg.num_layers,
                            scan=rt.scan, remat_policy=rt.remat_policy, name=BERT_STACK)
        kw = dict(use_bias=True, **dtypes(rt))
        pooled = jnp.tanh(dense(cfg.hidden_size, (("embed",), ("mlp",)), name="pooler", **kw)(x[:, 0]))
        return x, {"pooler_output": pooled}


class TextEncoder(nn.Module):
    """BERT, pooled (class token or masked mean), then a linear map into the contrastive space."""

    config: BertConfig
    embed_dim: int
    pooling: str = "cls"
    runtime: Runtime = Runtime()

    @nn.compact
    def __call__(self, input_ids, attention_mask):
        """Returns (embedding [batch, embed_dim], {"pooled", "tokens": BERT's last hidden states})."""
        hidden, _ = Bert(self.config, self.runtime, name="bert")(input_ids, attention_mask)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "mean":
            weights = attention_mask[..., None].astype(hidden.dtype)
            pooled = (hidden * weights).sum(1) / jnp.maximum(weights.sum(1), 1)
        else:
            raise ValueError(f"text pooling must be 'cls' or 'mean', got {self.pooling!r}")
        embedding = dense(self.embed_dim, (("embed",), ("clip",)), use_bias=False, name="proj", **dtypes(self.runtime))(
            pooled)
        return embedding, {"pooled": pooled, "tokens": hidden}
