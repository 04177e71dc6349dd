"""`cxrllava import-torch` and `cxrllava export-torch`."""

import argparse
import shutil
import tempfile
from pathlib import Path

from cxrllava_jax import files, hub
from cxrllava_jax.convert import checkpoint, hf_bert, hf_llama, model_card, release
from cxrllava_jax.convert.layout import stack_layers
from cxrllava_jax.domain.tokenizer import TOKENIZER_FILES
from cxrllava_jax.models.configs import Runtime
from cxrllava_jax.errors import InputError

FORMATS = ("release", "hf-llama", "hf-bert")
# What an export directory holds (weights, their index, configs, tokenizer files, modeling code, the model card);
# anything else is kept.
EXPORT_ENTRIES = ("*.safetensors", "*.json", "tokenizer*", "*.model", "*.py", "README.md")


def detect_format(src: Path) -> str:
    if not src.is_dir():
        raise InputError(f"{src}: no such directory (--src is a PyTorch model directory)")
    config_path = src / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{src}: no config.json; give --format")
    config = files.read_json(config_path)
    if "clip_vision_cfg" in config:
        return "release"
    kind = config.get("model_type")
    if kind in ("llama", "bert"):
        return f"hf-{kind}"
    raise InputError(f"{config_path}: cannot tell the format (model_type={kind!r}); give --format")


def import_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="cxrllava import-torch",
                                     description="PyTorch safetensors directory -> cxrllava-jax checkpoint")
    parser.add_argument("--src", required=True, type=Path, help="a PyTorch model directory or its Hub id")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--format", choices=FORMATS, help="default: detected from config.json")
    parser.add_argument("--scan", action="store_true", help="store layers stacked (for scan=True runtimes)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    files.refuse_existing(args.out, args.overwrite, owns=checkpoint.ENTRIES)  # before reading gigabytes of weights
    args.src = hub.resolve(args.src, what="--src")
    fmt = args.format or detect_format(args.src)
    kind, (config, params) = {
        "release": lambda: ("cxr_llava", release.load_release(args.src)),
        "hf-llama": lambda: ("llama", hf_llama.load_hf_llama(args.src)),
        "hf-bert": lambda: ("bert", hf_bert.load_hf_bert(args.src)),
    }[fmt]()
    tokenizer = _tokenizer_files(args.src)
    try:
        stored = stack_layers(params) if args.scan else params
        checkpoint.save_model(args.out, kind, config, stored, tokenizer_dir=tokenizer, scan=args.scan,
                              overwrite=args.overwrite)
    finally:
        if tokenizer:
            shutil.rmtree(tokenizer)
    print(f"imported {fmt} {args.src} -> {args.out} ({kind})")
    return 0


def export_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="cxrllava export-torch",
                                     description="cxrllava-jax checkpoint -> PyTorch safetensors directory")
    parser.add_argument("--checkpoint", required=True, type=Path, help="our checkpoint directory or its Hub id")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--layout", choices=("release", "hf-llama"), default="release")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--max-shard-size", type=_parse_size, default="5GB", help="e.g. 5GB, 500MB")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an export already in --out (the new one is written beside it and swapped in)")
    args = parser.parse_args(argv)
    files.refuse_existing(args.out, args.overwrite, owns=EXPORT_ENTRIES)  # before the weights are read
    args.checkpoint = hub.resolve(args.checkpoint, what="--checkpoint")
    kind = checkpoint.read_model_config(args.checkpoint)[0]
    exportable = {"release": ("cxr_llava",), "hf-llama": ("cxr_llava", "llama")}[args.layout]
    if kind not in exportable:
        raise InputError(f"--layout {args.layout} needs a {' or '.join(exportable)} checkpoint; "
                         f"{args.checkpoint} holds a {kind}")
    _, config, params = checkpoint.load_model(args.checkpoint, Runtime(scan=False))
    with files.staged_directory(args.out, args.overwrite, owns=EXPORT_ENTRIES) as staging:
        if args.layout == "release":
            release.save_release(staging, config, params, args.dtype, args.max_shard_size)
        else:
            llama_config, llama_params = (config.llama, params["llm"]) if kind == "cxr_llava" else (config, params)
            hf_llama.save_hf_llama(staging, llama_config, llama_params, args.dtype, args.max_shard_size)
        source_tokenizer = checkpoint.tokenizer_dir(args.checkpoint)
        if source_tokenizer:
            for f in source_tokenizer.iterdir():
                shutil.copy2(f, staging / f.name)
        model_card.write(staging, _exported_facts(args.checkpoint, args.layout, kind))
    print(f"exported {args.checkpoint} -> {args.out} ({args.layout}, {args.dtype})")
    return 0


def _exported_facts(checkpoint_dir: Path, layout: str, kind: str) -> dict:
    """The checkpoint's own card facts (how it was trained, how it scored) for its export; a checkpoint taken from
    the Hub is the export's base model."""
    facts = model_card.read(checkpoint_dir) or {"base_source": str(checkpoint_dir)}
    exported = "llama" if layout == "hf-llama" else kind
    return {**facts, "format": layout, "model_kind": exported,
            "base_model": hub.hub_id(checkpoint_dir) or facts.get("base_model")}


def _tokenizer_files(src: Path) -> Path | None:
    present = [src / name for name in TOKENIZER_FILES if (src / name).is_file()]
    if not present:
        return None
    staging = Path(tempfile.mkdtemp(prefix="cxrllava-tokenizer-"))
    for f in present:
        shutil.copy2(f, staging / f.name)
    return staging


def _parse_size(text: str) -> int:
    """'5GB', '500MB', '64KB' or a number of bytes -> bytes (argparse reports a bad value with the flag)."""
    units = {"GB": 2**30, "MB": 2**20, "KB": 2**10, "B": 1}
    number, factor = text, 1
    for unit, unit_factor in units.items():
        if text.upper().endswith(unit):
            number, factor = text[:-len(unit)], unit_factor
            break
    try:
        size = int(float(number) * factor)
    except ValueError:
        size = 0
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 5GB, 500MB or 1048576")
    return size
