"""The released CXR-LLaVA-v2 layout (REFERENCE.md): `vision_tower.*` (open_clip), `mm_projector.*`,
`llama.*`, `lm_head.weight`, and its config.json (clip_vision_cfg, clip_embed_dim, mm_projector_dim,
llama, image_preprocess_cfg)."""

import json
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
from flax import traverse_util

from cxrllava_jax import files
from cxrllava_jax.convert import hf_llama
from cxrllava_jax.convert.mapping import Entry, expected_shapes, export_tensors, iter_imported
from cxrllava_jax.convert.open_clip import vit_entries
from cxrllava_jax.convert.safetensors_io import SafetensorsReader, storage_dtype, write_sharded
from cxrllava_jax.models.configs import CXRLLaVAConfig, VisionConfig
from cxrllava_jax.errors import InputError

VISION_FIELDS = ("image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size", "ls_init_value",
                 "patch_dropout", "no_ln_pre", "final_ln_after_pool", "pool_type")
# open_clip options our ViT does not implement, with the one value we accept (and write on export).
FIXED_VISION = {"attentional_pool": False, "pos_embed_type": "learnable"}
REQUIRED = ("clip_vision_cfg", "clip_embed_dim", "llama")
# PyTorch code of ours that exports carry (torch and transformers only; never imported here).
MODELING_CODE = Path(__file__).parent / "torch_code" / "modeling_cxrllava.py"


def is_release_dir(directory) -> bool:
    config = Path(directory) / "config.json"
    return config.is_file() and "clip_vision_cfg" in files.read_json(config)


def config_from_release(release: dict, origin: str) -> CXRLLaVAConfig:
    missing = [k for k in REQUIRED if k not in release]
    if missing:
        raise InputError(f"{origin}: not a CXR-LLaVA release config, it lacks {missing}")
    vision_cfg = release["clip_vision_cfg"]
    unsupported = {k: vision_cfg[k] for k, ok in FIXED_VISION.items() if vision_cfg.get(k, ok) != ok}
    if vision_cfg.get("act_kwargs"):  # anything but open_clip's default exact GELU
        unsupported["act_kwargs"] = vision_cfg["act_kwargs"]
    if unsupported:
        raise InputError(f"{origin}: unsupported vision options {unsupported}")
    eps = (vision_cfg.get("norm_kwargs") or {}).get("eps", 1e-5)
    vision = VisionConfig(**{k: vision_cfg[k] for k in VISION_FIELDS if k in vision_cfg},
                          embed_dim=release["clip_embed_dim"], layer_norm_eps=eps)
    if release.get("mm_projector_dim", vision.width) != vision.width:
        raise InputError(f"{origin}: mm_projector_dim {release['mm_projector_dim']} != vision width {vision.width}")
    preprocess = release.get("image_preprocess_cfg", {})
    return CXRLLaVAConfig(vision=vision, llama=hf_llama.config_from_hf(release["llama"], f"{origin}: llama"),
                          projector="linear", image_mean=float(np.ravel(preprocess.get("mean", [0.5]))[0]),
                          image_std=float(np.ravel(preprocess.get("std", [0.5]))[0]))


def config_to_release(cfg: CXRLLaVAConfig) -> dict:
    v = cfg.vision
    vision = {k: getattr(v, k) for k in VISION_FIELDS}
    vision.update(FIXED_VISION, output_tokens=True, norm_kwargs={"eps": v.layer_norm_eps}, act_kwargs={})
    return {"clip_vision_cfg": vision, "clip_embed_dim": v.embed_dim, "mm_projector_dim": v.width,
            "llama": hf_llama.config_to_hf(cfg.llama),
            "image_preprocess_cfg": {"mean": [cfg.image_mean], "std": [cfg.image_std]}}


def release_entries(cfg: CXRLLaVAConfig) -> list[Entry]:
    if cfg.projector != "linear":
        raise ValueError(f"the release layout has a linear projector; this model's is {cfg.projector!r}")
    if cfg.projector_pool != 1:
        raise ValueError(f"the release layout reads every ViT patch; this model pools {cfg.projector_pool}x"
                         f"{cfg.projector_pool} (projector_pool)")
    return (vit_entries(cfg.vision, "vision_tower.", "img/")
            + [Entry("mm_projector.weight", "projector/linear/kernel", "linear"),
               Entry("mm_projector.bias", "projector/linear/bias", "copy")]
            + hf_llama.llama_entries(cfg.llama, "llama.", "lm_head.weight", "llm/"))


def release_expected_shapes(cfg: CXRLLaVAConfig) -> dict:
    import jax.numpy as jnp

    from cxrllava_jax.models.cxr_llava import CXRLLaVAModel

    size = cfg.vision.image_size
    tokens = jnp.full((1, cfg.num_image_tokens + 1), cfg.image_token_id, jnp.int32)
    return expected_shapes(CXRLLaVAModel(cfg), jnp.zeros((1, size, size, cfg.vision.in_channels)), tokens)


def load_release(directory) -> tuple[CXRLLaVAConfig, dict]:
    cfg, tensors = iter_release(directory)
    return cfg, traverse_util.unflatten_dict(dict(tensors), sep="/")


def iter_release(directory) -> tuple[CXRLLaVAConfig, Iterator[tuple[str, np.ndarray]]]:
    """The release's config and its tensors as (our parameter path, array), read one at a time: a caller that
    places each on its device as it comes never holds the model on the host."""
    directory = Path(directory)
    cfg = config_from_release(files.read_json(directory / "config.json"), str(directory / "config.json"))
    reader = SafetensorsReader(directory)
    ignored = [k for k in reader.keys() if k.endswith("rotary_emb.inv_freq")]
    return cfg, iter_imported(release_entries(cfg), reader, str(directory), release_expected_shapes(cfg), ignored)


def save_release(directory, cfg: CXRLLaVAConfig, params: dict, dtype: str = "bfloat16",
                 max_shard_bytes: int = 5 * 2**30):
    """Sharded safetensors (bfloat16 by default, as released) + config.json in the release schema, with our own
    PyTorch modeling code beside them (`auto_map`): `transformers.AutoModel.from_pretrained(directory,
    trust_remote_code=True)` loads it with nothing from the release's repository."""
    directory = Path(directory)
    write_sharded(directory, export_tensors(release_entries(cfg), params, storage_dtype(dtype)), max_shard_bytes)
    shutil.copyfile(MODELING_CODE, directory / MODELING_CODE.name)
    code = MODELING_CODE.stem
    config = {"architectures": ["CXRLLAVAModel"], "model_type": "CXR-LLAVA", **config_to_release(cfg),
              "auto_map": {"AutoConfig": f"{code}.CXRLLaVAConfig", "AutoModel": f"{code}.CXRLLAVAModel"},
              "torch_dtype": dtype}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
