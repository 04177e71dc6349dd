"""Model hyper-parameters as frozen dataclasses, with the named presets.

These are the architecture's facts (sizes, norms, pooling), separate from the training configs in
`configs/`, which pick a preset by name and override fields. `to_dict`/`from_dict` give the JSON that
travels with every checkpoint, so a checkpoint always says what model it holds.
"""

import dataclasses
from typing import Any

from cxrllava_jax.errors import ConfigError

# The dtypes the models compute and keep parameters in (float16 has no matrix product on CPU; integer and float8
# types cannot hold trained weights): `--dtype` offers these, and any other is refused as a Runtime is made.
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Runtime:
    """How the model runs, not what it is: shared by every tower."""

    dtype: str = "float32"  # compute dtype (bfloat16 on accelerators)
    param_dtype: str = "float32"  # float32 for training, bfloat16 is fine for inference
    scan: bool = False  # nn.scan over layers: one compiled layer body
    remat_policy: str = "none"  # see layers.remat_policy_of: what the backward pass keeps instead of recomputing
    # Attention kernel: 'xla', 'cudnn', 'splash' or 'auto' (see models/attention.py). `auto` everywhere (training,
    # inference, evaluation) so one rule picks the kernel: XLA on CPU, cuDNN or splash where they take the inputs.
    attention: str = "auto"

    def __post_init__(self):
        check_dtype(self.dtype, "runtime.dtype")
        check_dtype(self.param_dtype, "runtime.param_dtype")


def check_dtype(dtype: str | None, name: str = "dtype"):
    """Refuses a dtype the models cannot run in (None: the caller's default)."""
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"{name}={dtype!r}: expected one of {', '.join(DTYPES)}")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """open_clip VisionTransformer settings (the release's `clip_vision_cfg`) plus our embedding width."""

    image_size: int = 512
    patch_size: int = 16
    width: int = 1024
    layers: int = 24
    head_width: int = 64
    mlp_ratio: float = 4.0
    in_channels: int = 1
    embed_dim: int = 128  # contrastive embedding (`clip_embed_dim`)
    ls_init_value: float | None = None
    patch_dropout: float = 0.0
    no_ln_pre: bool = False
    final_ln_after_pool: bool = False
    pool_type: str = "tok"  # 'tok' (class token) or 'avg' (mean of patch tokens)
    layer_norm_eps: float = 1e-5

    @property
    def heads(self) -> int:
        return self.width // self.head_width

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def mlp_dim(self) -> int:
        return int(self.width * self.mlp_ratio)


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Hugging Face BertConfig fields that define the network."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """transformers' `rope_scaling` (4.x) / `rope_parameters` (5.x) beyond rope_theta (`models.rope`)."""

    rope_type: str = "default"  # 'default', 'linear', 'dynamic' or 'llama3'
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int | None = None  # llama3


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hugging Face LlamaConfig fields that define the network."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int | None = None  # hidden_size // num_heads unless set
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False  # the output head is the embedding table (SmolLM2, Llama 3.2 1B/3B)
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class CXRLLaVAConfig:
    vision: VisionConfig = VisionConfig()
    llama: LlamaConfig = LlamaConfig()
    projector: str = "linear"  # 'linear' (release) or 'mlp2x_gelu'
    image_mean: float = 0.5
    image_std: float = 0.5
    image_token_id: int = -200  # the release's placeholder id for `<image>`
    # Token reduction for several images in one context: the ViT's grid averaged over pool x pool patches before
    # the projector (2: 256 tokens an image instead of the release's 1,024). 1 (off) is the release.
    projector_pool: int = 1

    def __post_init__(self):
        if self.projector_pool < 1 or self.vision.grid % self.projector_pool:
            raise ConfigError(f"projector_pool must be a divisor of the ViT's {self.vision.grid}-patch grid, got "
                              f"{self.projector_pool}")

    @property
    def num_image_tokens(self) -> int:
        return (self.vision.grid // self.projector_pool) ** 2


@dataclasses.dataclass(frozen=True)
class ContrastiveConfig:
    """Stage 1B: the image tower against a BERT text tower."""

    vision: VisionConfig = VisionConfig()
    text: BertConfig = BertConfig()
    text_pooling: str = "cls"  # 'cls' or 'mean' (sentence-transformers models such as MiniLM use mean)
    init_temperature: float = 0.07


_NESTED = {"vision": VisionConfig, "llama": LlamaConfig, "text": BertConfig, "rope_scaling": RopeScaling}


def to_dict(config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(cls, values: dict[str, Any]):
    """Builds `cls` from a dict, refusing unknown keys by name (a typo must not pass silently)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {unknown}; known: {sorted(names)}")
    kwargs = {k: (from_dict(_NESTED[k], v) if k in _NESTED and isinstance(v, dict) else v) for k, v in values.items()}
    return cls(**kwargs)


VISION_PRESETS = {
    "vit_l16_512": VisionConfig(),
    "vit_b16_512": VisionConfig(width=768, layers=12),
    "vit_tiny_64": VisionConfig(image_size=64, patch_size=16, width=64, layers=2, head_width=16, embed_dim=32),
    "vit_tiny_32": VisionConfig(image_size=32, patch_size=8, width=32, layers=2, head_width=16, embed_dim=16),
}

LLAMA_PRESETS = {
    "llama2_7b": LlamaConfig(),
    "llama2_13b": LlamaConfig(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40),
    "llama_tiny": LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=172, num_layers=2, num_heads=4,
                              num_kv_heads=4, max_position_embeddings=512),
    "llama_tiny_gqa": LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=172, num_layers=2, num_heads=4,
                                  num_kv_heads=2, max_position_embeddings=512),
}

BERT_PRESETS = {
    "bert_base": BertConfig(),
    "minilm_l6": BertConfig(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536),
    # The standard uncased WordPiece vocabulary, so any BERT tokenizer (MiniLM's included) feeds it.
    "bert_tiny": BertConfig(vocab_size=30522, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                            max_position_embeddings=64),
}

CXR_LLAVA_PRESETS = {
    "cxr_llava_v2": CXRLLaVAConfig(vision=VISION_PRESETS["vit_l16_512"], llama=LLAMA_PRESETS["llama2_7b"]),
    "cxr_llava_tiny": CXRLLaVAConfig(vision=VISION_PRESETS["vit_tiny_64"], llama=LLAMA_PRESETS["llama_tiny"]),
}
