"""PyTorch references the parity tests and the model benchmark compare our Flax models against (needs torch,
from the `test` extra).

- `VisionTransformer`: open_clip's `VisionTransformer` semantics (REFERENCE.md), built on
  `torch.nn.MultiheadAttention`, with exactly open_clip's parameter names (`conv1.weight`,
  `transformer.resblocks.{i}.attn.in_proj_weight`, `ls_1.gamma`, ...), so its `state_dict()` is what
  an open_clip checkpoint (or the release's `vision_tower.*`) holds.
- `ReleaseCXRLLaVA`: the released model's forward: the prompt carries one `IMAGE_PLACEHOLDER` id that
  is replaced by `mm_projector(vision tokens)`, then `transformers.LlamaModel` on `inputs_embeds` and
  an untied `lm_head`. Its `state_dict()` keys are the release's.
- Writers for safetensors directories (single file or sharded with an index) and the release's
  config.json, written from REFERENCE.md rather than from our converter, so a schema slip in the
  converter cannot cancel out.
"""

import dataclasses
import json
from collections import OrderedDict
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from torch import nn

from cxrllava_jax.models.configs import CXRLLaVAConfig, LlamaConfig, VisionConfig

IMAGE_PLACEHOLDER = -200  # the release's token id for `<image>`


class LayerScale(nn.Module):
    def __init__(self, width: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(init_value * torch.ones(width))

    def forward(self, x):
        return x * self.gamma


class ResidualAttentionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        ls = cfg.ls_init_value
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = nn.MultiheadAttention(cfg.width, cfg.heads, batch_first=True)
        self.ls_1 = LayerScale(cfg.width, ls) if ls is not None else nn.Identity()
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(cfg.width, cfg.mlp_dim)), ("gelu", nn.GELU()),
            ("c_proj", nn.Linear(cfg.mlp_dim, cfg.width))]))
        self.ls_2 = LayerScale(cfg.width, ls) if ls is not None else nn.Identity()

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.ls_1(self.attn(h, h, h, need_weights=False)[0])
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(cfg) for _ in range(cfg.layers)])

    def forward(self, x):
        for block in self.resblocks:
            x = block(x)
        return x


class VisionTransformer(nn.Module):
    """open_clip `VisionTransformer` (learnable positions, no attentional pool), eval mode semantics."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        scale = cfg.width**-0.5
        self.conv1 = nn.Conv2d(cfg.in_channels, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(cfg.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(cfg.grid**2 + 1, cfg.width))
        self.ln_pre = nn.Identity() if cfg.no_ln_pre else nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.transformer = Transformer(cfg)
        self.ln_post = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.proj = nn.Parameter(scale * torch.randn(cfg.width, cfg.embed_dim))

    def _global_pool(self, x):
        if self.cfg.pool_type == "avg":
            return x[:, 1:].mean(dim=1), x[:, 1:]
        return x[:, 0], x[:, 1:]

    def forward(self, images):
        """images: [batch, channels, H, W]. Returns (pooled, embedding = pooled @ proj, patch tokens)."""
        x = self.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        if self.cfg.final_ln_after_pool:
            pooled, tokens = self._global_pool(x)
            pooled = self.ln_post(pooled)
        else:
            x = self.ln_post(x)
            pooled, tokens = self._global_pool(x)
        return pooled, pooled @ self.proj, tokens


def hf_llama_config(cfg: LlamaConfig) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.resolved_head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings, bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id, tie_word_embeddings=cfg.tie_word_embeddings,
        rope_scaling=None if cfg.rope_scaling.rope_type == "default" else {
            k: v for k, v in dataclasses.asdict(cfg.rope_scaling).items() if v is not None},
        attn_implementation="eager")


class ReleaseCXRLLaVA(nn.Module):
    """The released CXR-LLaVA-v2 forward, with the release's parameter names."""

    def __init__(self, cfg: CXRLLaVAConfig):
        super().__init__()
        self.vision_tower = VisionTransformer(cfg.vision)
        self.mm_projector = nn.Linear(cfg.vision.width, cfg.llama.hidden_size)
        self.llama = transformers.LlamaModel(hf_llama_config(cfg.llama))
        self.lm_head = nn.Linear(cfg.llama.hidden_size, cfg.llama.vocab_size, bias=False)

    def multimodal_embeds(self, images, input_ids):
        """One prompt per image, each with exactly one IMAGE_PLACEHOLDER (prompts of equal length)."""
        image_tokens = self.mm_projector(self.vision_tower(images)[2])
        rows = []
        for ids, image in zip(input_ids, image_tokens):
            (at,) = torch.nonzero(ids == IMAGE_PLACEHOLDER)[:, 0].tolist()
            embed = self.llama.embed_tokens
            rows.append(torch.cat([embed(ids[:at]), image, embed(ids[at + 1:])]))
        return torch.stack(rows)

    def forward(self, images, input_ids):
        """images: [batch, 1, H, W]; input_ids: [batch, text_len].

        Returns logits [batch, text_len - 1 + grid^2, vocab].
        """
        hidden = self.llama(inputs_embeds=self.multimodal_embeds(images, input_ids)).last_hidden_state
        return self.lm_head(hidden)


def randomize_(module: nn.Module, seed: int, std: float = 0.1) -> nn.Module:
    """Every parameter random, norm scales near 1: a swapped or mis-transposed tensor cannot hide."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            is_norm_scale = p.ndim == 1 and name.endswith("weight") and ("ln" in name or "norm" in name)
            p.copy_(1.0 + std * noise if is_norm_scale else std * noise)
    return module.eval()


def save_safetensors_dir(state_dict: dict, directory, num_shards: int = 1, dtype=None) -> Path:
    """Writes `model.safetensors`, or `model-0000i-of-0000n.safetensors` + index as `save_pretrained` does."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype else v).detach().contiguous() for k, v in state_dict.items()}
    if num_shards == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory
    keys = list(tensors)
    weight_map = {}
    for i in range(num_shards):
        name = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::num_shards]}
        save_file(part, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return directory


def release_config_json(cfg: CXRLLaVAConfig) -> dict:
    """config.json as the release writes it (REFERENCE.md); `llama` as transformers 4.x serialised it."""
    v, lm = cfg.vision, cfg.llama
    vision = {"image_size": v.image_size, "layers": v.layers, "width": v.width, "head_width": v.head_width,
              "mlp_ratio": v.mlp_ratio, "patch_size": v.patch_size, "ls_init_value": v.ls_init_value,
              "patch_dropout": v.patch_dropout, "attentional_pool": False, "attn_pooler_queries": 256,
              "attn_pooler_heads": 8, "pos_embed_type": "learnable", "no_ln_pre": v.no_ln_pre,
              "final_ln_after_pool": v.final_ln_after_pool, "pool_type": v.pool_type, "output_tokens": True,
              "act_kwargs": None, "norm_kwargs": {"eps": v.layer_norm_eps}, "in_chans": v.in_channels}
    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": lm.vocab_size,
             "hidden_size": lm.hidden_size, "intermediate_size": lm.intermediate_size,
             "num_hidden_layers": lm.num_layers, "num_attention_heads": lm.num_heads,
             "num_key_value_heads": lm.num_kv_heads, "hidden_act": "silu", "rms_norm_eps": lm.rms_norm_eps,
             "rope_theta": lm.rope_theta, "rope_scaling": None, "max_position_embeddings": lm.max_position_embeddings,
             "bos_token_id": lm.bos_token_id, "eos_token_id": lm.eos_token_id, "pad_token_id": lm.pad_token_id,
             "attention_bias": False, "attention_dropout": 0.0, "pretraining_tp": 1, "tie_word_embeddings": False,
             "initializer_range": 0.02, "use_cache": True, "torch_dtype": "bfloat16", "transformers_version": "4.36.2"}
    return {"architectures": ["CXRLLAVAModel"], "model_type": "CXR-LLAVA", "clip_vision_cfg": vision,
            "clip_embed_dim": v.embed_dim, "mm_projector_dim": v.width, "llama": llama,
            "image_preprocess_cfg": {"mean": [cfg.image_mean], "std": [cfg.image_std]},
            "torch_dtype": "bfloat16"}


def save_release_dir(model: ReleaseCXRLLaVA, cfg: CXRLLaVAConfig, directory, num_shards: int = 2, dtype=None) -> Path:
    directory = save_safetensors_dir(model.state_dict(), directory, num_shards, dtype)
    (directory / "config.json").write_text(json.dumps(release_config_json(cfg), indent=2))
    return directory
