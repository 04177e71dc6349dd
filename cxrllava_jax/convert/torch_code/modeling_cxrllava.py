"""CXR-LLaVA in PyTorch, written by cxrllava-jax into every `export-torch --layout release` directory, so that

    model = transformers.AutoModel.from_pretrained(directory_or_hub_id, trust_remote_code=True)
    model.write_radiologic_report(PIL.Image.open("cxr.png"))
    model.write_differential_diagnosis("cxr.png")
    model.ask_question("Is there a pneumothorax?", "cxr.png")

works with this file alone: the same weights, config.json and method names as the released CXR-LLaVA-v2, and
its preprocessing (8-bit grayscale, shortest edge to the image size with LANCZOS, center crop, (x/255 - mean) /
std) and prompts (the LLaMA-2 chat template with the release's system prompt, tokenized as transformers 4.36.2's
slow LlamaTokenizer does: pieces split at <s>, </s> and <unk>, each with SentencePiece's dummy prefix). It needs
torch, transformers, sentencepiece and Pillow; nothing from cxrllava-jax or from the release's repository.
Batch size 1, as the release. `forward(input_ids, pixel_values)` gives the logits of a prompt whose one
IMAGE_TOKEN_ID marks where the image's patch tokens go.
"""

import inspect
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaModel, PretrainedConfig, PreTrainedModel

IMAGE_TOKEN_ID = -200  # the release's placeholder for `<image>`
SYSTEM_PROMPT = ("You are a helpful radiologist. Try to interpret chest x ray image and answer to the question "
                 "that user provides.")
REPORT_QUESTION = ("Write a radiologic report on the given chest radiograph, including information about "
                   "atelectasis, cardiomegaly, consolidation, pulmonary edema, pleural effusion, and pneumothorax.\n")
DIFFERENTIAL_QUESTION = "What are the possible differential diagnoses for this patient?\n"


class CXRLLaVAConfig(PretrainedConfig):
    model_type = "CXR-LLAVA"

    def __init__(self, clip_vision_cfg=None, clip_embed_dim=None, mm_projector_dim=None, llama=None,
                 image_preprocess_cfg=None, **kwargs):
        self.clip_vision_cfg, self.clip_embed_dim = clip_vision_cfg or {}, clip_embed_dim
        self.mm_projector_dim, self.llama = mm_projector_dim, llama or {}
        self.image_preprocess_cfg = image_preprocess_cfg or {"mean": [0.5], "std": [0.5]}
        super().__init__(**kwargs)


class _ResidualAttentionBlock(nn.Module):
    """open_clip's block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); exact GELU; optional layer scale."""

    def __init__(self, width: int, heads: int, mlp_width: int, eps: float, ls_init_value):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width, eps=eps), nn.LayerNorm(width, eps=eps)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, mlp_width))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(mlp_width, width))
        if ls_init_value is not None:
            self.ls_1, self.ls_2 = _LayerScale(width), _LayerScale(width)
        else:
            self.ls_1 = self.ls_2 = nn.Identity()

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.ls_1(self.attn(h, h, h, need_weights=False)[0])
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class _LayerScale(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return x * self.gamma


class _VisionTransformer(nn.Module):
    """open_clip's VisionTransformer (one input channel, learnable positions, token pooling); returns the patch
    tokens the language model sees."""

    def __init__(self, cfg: dict, embed_dim: int):
        super().__init__()
        width, patch, size = cfg["width"], cfg["patch_size"], cfg["image_size"]
        eps = (cfg.get("norm_kwargs") or {}).get("eps", 1e-5)
        # The language model sees the patch tokens: after ln_post unless it is applied to the pooled token alone
        # (whatever the pooling, it does not change the tokens).
        self.final_ln_after_pool = cfg.get("final_ln_after_pool", False)
        self.conv1 = nn.Conv2d(cfg.get("in_chans", 1), width, patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros((size // patch) ** 2 + 1, width))
        self.ln_pre = nn.Identity() if cfg.get("no_ln_pre") else nn.LayerNorm(width, eps=eps)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(
            _ResidualAttentionBlock(width, width // cfg["head_width"], int(width * cfg["mlp_ratio"]), eps,
                                    cfg.get("ls_init_value")) for _ in range(cfg["layers"]))
        self.ln_post = nn.LayerNorm(width, eps=eps)
        self.proj = nn.Parameter(torch.zeros(width, embed_dim))

    def forward(self, pixel_values):
        x = self.conv1(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
        x = self.ln_pre(x + self.positional_embedding.to(x.dtype))
        for block in self.transformer.resblocks:
            x = block(x)
        return x[:, 1:] if self.final_ln_after_pool else self.ln_post(x)[:, 1:]


class CXRLLAVAModel(PreTrainedModel):
    config_class = CXRLLaVAConfig
    base_model_prefix = "cxr_llava"
    _no_split_modules = ["LlamaDecoderLayer", "_ResidualAttentionBlock"]

    def __init__(self, config: CXRLLaVAConfig):
        super().__init__(config)
        llama = LlamaConfig(**{k: v for k, v in config.llama.items() if k not in ("architectures", "torch_dtype")})
        self.vision_tower = _VisionTransformer(config.clip_vision_cfg, config.clip_embed_dim)
        self.mm_projector = nn.Linear(config.mm_projector_dim, llama.hidden_size)
        self.llama = LlamaModel(llama)
        self.lm_head = nn.Linear(llama.hidden_size, llama.vocab_size, bias=False)
        self._tokenizer = None
        self.post_init()

    def _init_weights(self, module):
        """Every weight comes from the checkpoint; nothing to initialise beyond torch's defaults."""

    # ---------------------------------------------------------------- the forward

    def embeddings(self, input_ids, pixel_values):
        """[1, text_len - 1 + patches, hidden]: the one IMAGE_TOKEN_ID replaced by the projected patch tokens."""
        (ids,) = input_ids
        (at,) = torch.nonzero(ids == IMAGE_TOKEN_ID)[:, 0].tolist()
        image = self.mm_projector(self.vision_tower(pixel_values.to(self.lm_head.weight.dtype)))[0]
        embed = self.llama.embed_tokens
        return torch.cat([embed(ids[:at]), image, embed(ids[at + 1:])])[None]

    def forward(self, input_ids, pixel_values):
        """Logits [1, text_len - 1 + patches, vocab]."""
        hidden = self.llama(inputs_embeds=self.embeddings(input_ids, pixel_values)).last_hidden_state
        return self.lm_head(hidden)

    # ---------------------------------------------------------------- the release's methods

    def write_radiologic_report(self, image, temperature: float = 0.2, top_p: float = 0.8, **options) -> str:
        return self.generate_cxr_answer([{"role": "user", "content": "<image>\n" + REPORT_QUESTION}], image,
                                        temperature, top_p, **options)

    def write_differential_diagnosis(self, image, temperature: float = 0.2, top_p: float = 0.8, **options) -> str:
        return self.generate_cxr_answer([{"role": "user", "content": "<image>\n" + DIFFERENTIAL_QUESTION}], image,
                                        temperature, top_p, **options)

    def ask_question(self, question: str, image, temperature: float = 0.2, top_p: float = 0.8, **options) -> str:
        return self.generate_cxr_answer([{"role": "user", "content": "<image>\n" + question}], image, temperature,
                                        top_p, **options)

    @torch.no_grad()
    def generate_cxr_answer(self, chat: list, image, temperature: float = 0.2, top_p: float = 0.8,
                            max_new_tokens: int = 512, seed: int | None = None) -> str:
        """The answer to a conversation whose first user turn carries `<image>` (temperature 0: greedy)."""
        ids = self.prompt_ids(chat)
        pixel_values = self.preprocess(image)
        vision = self.config.clip_vision_cfg
        length = len(ids) - 1 + (vision["image_size"] // vision["patch_size"]) ** 2  # the image's patches included
        budget = min(max_new_tokens, self.config.llama["max_position_embeddings"] - length - 1)
        tokens = self.generate_ids(torch.tensor([ids]), pixel_values, budget, temperature, top_p, seed)
        return self.tokenizer().decode(tokens)

    def generate_ids(self, input_ids, pixel_values, max_new_tokens: int, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int | None = None) -> list[int]:
        """New token ids until EOS (not included) or `max_new_tokens`, with the language model's KV cache."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        eos = self.config.llama.get("eos_token_id", 2)
        # transformers 5 names the cache argument `cache`, 4.x `past_key_values`; the cache fills in place.
        cache = {_cache_argument(self.llama): DynamicCache()}
        embeds, out = self.embeddings(input_ids, pixel_values), []
        for _ in range(max_new_tokens):
            step = self.llama(inputs_embeds=embeds, use_cache=True, **cache)
            logits = self.lm_head(step.last_hidden_state[0, -1]).float()
            token = _next_token(logits, temperature, top_p, generator)
            if token == eos:
                break
            out.append(token)
            embeds = self.llama.embed_tokens(torch.tensor([[token]]))
        return out

    # ---------------------------------------------------------------- the release's preprocessing and prompts

    def preprocess(self, image) -> torch.Tensor:
        """A path, PIL image or 2-D uint8 array -> [1, 1, size, size] float pixels as the release makes them."""
        if isinstance(image, (str, Path)):
            image = Image.open(image)
        if isinstance(image, np.ndarray):
            if image.max(initial=0) > 255:
                raise ValueError("pixel values above 255: give an 8-bit image (window it first)")
            image = Image.fromarray(image.astype(np.uint8))
        gray = image.convert("L")
        size = self.config.clip_vision_cfg["image_size"]
        width, height = gray.size
        resized = (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
        if resized != gray.size:
            gray = gray.resize(resized, Image.Resampling.LANCZOS)
        left, top = (gray.size[0] - size) // 2, (gray.size[1] - size) // 2
        pixels = np.asarray(gray.crop((left, top, left + size, top + size)), np.float32) * np.float32(1 / 255)
        mean, std = (float(np.ravel(self.config.image_preprocess_cfg[k])[0]) for k in ("mean", "std"))
        return torch.from_numpy((pixels - np.float32(mean)) / np.float32(std))[None, None]

    def prompt_ids(self, chat: list, system: str = SYSTEM_PROMPT) -> list[int]:
        """The LLaMA-2 chat prompt with one IMAGE_TOKEN_ID where `<image>` stands, as the release tokenizes it."""
        text = ""
        for i, turn in enumerate(chat):
            if turn["role"] == "user":
                header = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if i == 0 else ""
                text += f"<s>[INST] {header}{turn['content'].strip()} [/INST]"
            else:
                text += f" {turn['content'].strip()} </s>"
        tokenizer = self.tokenizer()
        chunks = [tokenizer.encode_with_bos(chunk) for chunk in text.split("<image>")]
        ids = chunks[0]
        for chunk in chunks[1:]:
            ids += [IMAGE_TOKEN_ID] + chunk[1:]
        return ids

    def tokenizer(self) -> "_SlowLlamaTokenizer":
        if self._tokenizer is None:
            self._tokenizer = _SlowLlamaTokenizer(_model_file(self.config._name_or_path, "tokenizer.model"))
        return self._tokenizer


def _cache_argument(llama: LlamaModel) -> str:
    return "cache" if "cache" in inspect.signature(llama.forward).parameters else "past_key_values"


def _next_token(logits: torch.Tensor, temperature: float, top_p: float, generator) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    ordered, order = torch.sort(probs, descending=True)
    keep = torch.cumsum(ordered, 0) - ordered < top_p  # the smallest set whose mass reaches top_p
    ordered = torch.where(keep, ordered, torch.zeros_like(ordered))
    return int(order[torch.multinomial(ordered / ordered.sum(), 1, generator=generator)])


def _model_file(name_or_path: str, filename: str) -> str:
    local = Path(name_or_path) / filename
    if local.is_file():
        return str(local)
    from huggingface_hub import hf_hub_download

    return hf_hub_download(name_or_path, filename)


class _SlowLlamaTokenizer:
    """transformers 4.36.2's slow LlamaTokenizer (legacy), which the release's prompts were made with: the text is
    split at <s>, </s> and <unk>, which become their ids, and every other piece is encoded by SentencePiece with its
    dummy prefix; BOS in front."""

    def __init__(self, model_file: str):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        self.special = {self.sp.id_to_piece(i): i for i in (self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id())
                        if i >= 0}
        self.split = re.compile("(" + "|".join(map(re.escape, sorted(self.special, key=len, reverse=True))) + ")")

    def encode_with_bos(self, text: str) -> list[int]:
        ids = [self.sp.bos_id()]
        for piece in self.split.split(text):
            if piece in self.special:
                ids.append(self.special[piece])
            elif piece:
                ids += self.sp.encode(piece)
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if i not in self.special.values()]).strip()
