"""LoRA adapters in Hugging Face PEFT's format, both ways: what `peft.PeftModel.from_pretrained` applies to the
language model of our hf-llama export, and adapters made with `peft` brought back.

    DIR/adapter_config.json        {"peft_type": "LORA", "r", "lora_alpha", "target_modules", ...}
    DIR/adapter_model.safetensors  base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight [r, in]
                                   base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight [out, r]

Ours are Qwix's `kernel_lora_a` [in, r] and `kernel_lora_b` [r, out] beside each kernel; inputs and outputs
flatten (heads, head_dim) head-major, as PyTorch's Linear rows do, so the two are transposes of each other.
PEFT scales by lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA), ours by alpha / rank.
"""

import json
import math
import os
import re
from pathlib import Path

import jax
import numpy as np
import safetensors.numpy
from flax import traverse_util

from cxrllava_jax import files
from cxrllava_jax.convert.layout import relayout
from cxrllava_jax.convert.mapping import ConversionError
from cxrllava_jax.models import lora

# LLaMA module -> (its parent in LlamaDecoderLayer, how many leading axes of our kernel are its input).
MODULES = {"q_proj": ("self_attn", 1), "k_proj": ("self_attn", 1), "v_proj": ("self_attn", 1),
           "o_proj": ("self_attn", 2), "gate_proj": ("mlp", 1), "up_proj": ("mlp", 1), "down_proj": ("mlp", 1)}
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
_OURS = re.compile(rf"^llm/layers/block_(\d+)/({'|'.join(MODULES)})/kernel_lora_([ab])$")
_THEIRS = re.compile(rf"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.({'|'.join(MODULES)})"
                     rf"\.lora_([AB])\.weight$")
# PEFT options that change what the adapter computes and have no equivalent here.
_UNSUPPORTED = {"use_dora": False, "bias": "none", "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
                "layers_to_transform": None, "fan_in_fan_out": False, "lora_bias": False}


def save_peft(directory, params, settings: lora.LoraSettings, base_model: str = "", overwrite: bool = False):
    """Writes the adapters of a CXR-LLaVA parameter tree (scanned or not) as a PEFT LoRA directory.

    Only the language model's projections have a place in a LlamaForCausalLM adapter: adapters elsewhere (the
    projector, the ViT) are refused, their fine-tuning lives in the merged export."""
    found = lora.adapters(relayout(params, scan=False))
    elsewhere = sorted(k for k in found if not _OURS.match(k))
    if elsewhere:
        raise ConversionError(f"a PEFT adapter for the language model cannot hold {elsewhere[:4]}"
                              f"{' ...' if len(elsewhere) > 4 else ''}; export the merged model instead")
    tensors = {}
    for path, value in found.items():
        layer, module, part = _OURS.match(path).groups()
        key = f"base_model.model.model.layers.{layer}.{MODULES[module][0]}.{module}.lora_{part.upper()}.weight"
        tensors[key] = np.ascontiguousarray(np.asarray(value, np.float32).T)
    modules = sorted({_OURS.match(k).group(2) for k in found})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": settings.rank, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
              "target_modules": modules, "use_rslora": False, "init_lora_weights": True, "inference_mode": True,
              **_UNSUPPORTED}
    with files.staged_directory(directory, overwrite, owns=(CONFIG_NAME, WEIGHTS_NAME)) as staging:
        safetensors.numpy.save_file(tensors, staging / WEIGHTS_NAME, metadata={"format": "pt"})
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return Path(os.path.abspath(directory))


def load_peft(directory) -> tuple[lora.LoraSettings, dict]:
    """(settings, {our unscanned adapter path: array}) from a PEFT LoRA directory made by `peft` or `save_peft`."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{directory} is not a PEFT adapter directory: {path.name} is missing")
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "LORA":
        raise ConversionError(f"{config_path}: peft_type {config.get('peft_type')!r}; only LORA adapters convert")
    unsupported = {k: config[k] for k, default in _UNSUPPORTED.items() if config.get(k) not in (default, None, {}, [])}
    if unsupported:
        raise ConversionError(f"{config_path}: unsupported PEFT options {unsupported}")
    rank = int(config["r"])
    # rsLoRA scales by alpha / sqrt(r); the same scale as alpha' / r.
    alpha = float(config["lora_alpha"]) * (math.sqrt(rank) if config.get("use_rslora") else 1.0)
    adapters, problems = {}, []
    for key, value in safetensors.numpy.load_file(weights_path).items():
        match = _THEIRS.match(key)
        if not match or MODULES[match.group(3)][0] != match.group(2):
            problems.append(f"unexpected {key}")
            continue
        layer, _, module, part = match.groups()
        expected = (rank, None) if part == "A" else (None, rank)
        if value.ndim != 2 or any(e is not None and e != s for e, s in zip(expected, value.shape)):
            problems.append(f"{key}: shape {value.shape} does not fit rank {rank}")
            continue
        adapters[f"llm/layers/block_{layer}/{module}/kernel_lora_{part.lower()}"] = np.ascontiguousarray(value.T)
    modules = sorted({_OURS.match(k).group(2) for k in adapters})
    layers = sorted({int(_OURS.match(k).group(1)) for k in adapters})
    for layer in layers:  # PEFT may adapt some layers only (layers_to_transform); Qwix rules cover all of them
        for module in modules:
            for part in "ab":
                if f"llm/layers/block_{layer}/{module}/kernel_lora_{part}" not in adapters:
                    problems.append(f"layer {layer} lacks {module} lora_{part.upper()}: every layer needs the same "
                                    "modules")
    if problems or not adapters:
        raise ConversionError(f"{weights_path}: {len(problems) or 'no'} problem(s) with the adapter"
                              + ("" if not problems else ":\n  " + "\n  ".join(problems)))
    settings = lora.LoraSettings(rank=rank, alpha=alpha, dropout=float(config.get("lora_dropout") or 0.0),
                                 targets=(rf"llm/layers/block(_\d+)?/({'|'.join(modules)})",))
    return settings, adapters


def apply_adapter(params: dict, directory) -> dict:
    """Unscanned CXR-LLaVA params with the PEFT adapter in `directory` folded in (`lora.merge`): the adapted
    model, served or exported without a merged copy on disk. Adapter and model must fit each other."""
    settings, adapters = load_peft(directory)
    flat = traverse_util.flatten_dict(params, sep="/")
    problems = []
    for path, value in adapters.items():
        kernel_path = path.rsplit("_lora_", 1)[0]
        if kernel_path not in flat:
            problems.append(f"{path}: the model has no {kernel_path}")
            continue
        shape, inputs = np.shape(flat[kernel_path]), MODULES[kernel_path.split("/")[-2]][1]
        fan = math.prod(shape[:inputs]) if path.endswith("_a") else math.prod(shape[inputs:])
        if value.shape[0 if path.endswith("_a") else 1] != fan:
            problems.append(f"{path}: {value.shape} does not fit the kernel {shape}")
    if problems:
        raise ConversionError(f"the adapter in {directory} does not fit the model:\n  " + "\n  ".join(problems))
    merged = lora.merge(traverse_util.unflatten_dict({**flat, **adapters}, sep="/"), settings)
    return jax.tree.map(np.asarray, merged)
