"""The model a fine-tuning run starts from: the release's PyTorch directory (`config.init.release`) or any of
our CXR-LLaVA checkpoints (`config.init.checkpoint`), with its own architecture, weights and tokenizer."""

import json
from pathlib import Path

from cxrllava_jax.convert import checkpoint as model_checkpoint
from cxrllava_jax.convert import release
from cxrllava_jax.convert.layout import relayout
from cxrllava_jax.errors import ConfigError, InputError, MismatchError
from cxrllava_jax.models.configs import CXRLLaVAConfig, Runtime


def config(cfg) -> CXRLLaVAConfig:
    if cfg.init.release:
        config_path = _release_dir(cfg) / "config.json"
        return release.config_from_release(json.loads(config_path.read_text()), str(config_path))
    kind, model_config, _ = model_checkpoint.read_model_config(_checkpoint_dir(cfg))
    _check_kind(cfg, kind)
    return model_config


def params(cfg) -> dict:
    """The base weights as host arrays, in the layer layout `config.runtime.scan` asks for."""
    if cfg.init.release:
        return relayout(release.load_release(_release_dir(cfg))[1], scan=cfg.runtime.scan)
    kind, _, weights = model_checkpoint.load_model(_checkpoint_dir(cfg), Runtime(scan=cfg.runtime.scan))
    _check_kind(cfg, kind)
    return weights


def tokenizer_dir(cfg) -> Path:
    """`config.data.tokenizer` if given, else the base model's own tokenizer."""
    if cfg.data.tokenizer:
        return Path(cfg.data.tokenizer)
    found = _release_dir(cfg) if cfg.init.release else model_checkpoint.tokenizer_dir(_checkpoint_dir(cfg))
    if found is None:
        raise InputError(f"{cfg.init.checkpoint} has no tokenizer/ directory; set config.data.tokenizer")
    return found


def _release_dir(cfg) -> Path:
    path = Path(cfg.init.release)
    if not release.is_release_dir(path):
        raise InputError(f"config.init.release={path} is not a CXR-LLaVA release directory (config.json with "
                         "clip_vision_cfg)")
    return path


def _checkpoint_dir(cfg) -> Path:
    if not cfg.init.checkpoint:
        raise ConfigError("fine-tuning starts from a trained model: set config.init.release (the released PyTorch "
                          "directory) or config.init.checkpoint (one of our CXR-LLaVA checkpoints)")
    return Path(cfg.init.checkpoint)


def _check_kind(cfg, kind: str):
    if kind != "cxr_llava":
        raise MismatchError(f"config.init.checkpoint={cfg.init.checkpoint} holds a {kind!r} model; fine-tuning needs a "
                            "CXR-LLaVA one (stage 2A/2B output, import-torch of the release, or a fine-tuned model)")
