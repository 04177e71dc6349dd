"""Our model checkpoint: what every stage exports, what import-torch writes and what inference loads.

    CKPT/model_config.json   {"model": kind, "config": {...}, "scan": bool}
    CKPT/params/             the parameter tree, written by Orbax
    CKPT/tokenizer/          optional: the tokenizer files that go with the language model

Kinds: 'cxr_llava', 'llama', 'bert', 'vit', 'vit_classifier' (stage 1A), 'contrastive' (stage 1B).
"""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from cxrllava_jax.convert.layout import relayout
from cxrllava_jax.models import configs as mc
from cxrllava_jax.errors import InputError

CONFIG_CLASSES = {
    "cxr_llava": mc.CXRLLaVAConfig, "llama": mc.LlamaConfig, "bert": mc.BertConfig, "vit": mc.VisionConfig,
    "vit_classifier": mc.VisionConfig, "contrastive": mc.ContrastiveConfig,
}


def save_model(path, kind: str, config, params, *, tokenizer_dir=None, scan: bool = False, overwrite: bool = False):
    """Writes a model checkpoint; an existing one is replaced only with `overwrite` (and only once the new
    one is complete: it is written beside and swapped in, so a crash never leaves neither)."""
    path = Path(path).absolute()
    if kind not in CONFIG_CLASSES:
        raise ValueError(f"unknown model kind {kind!r}; known: {sorted(CONFIG_CLASSES)}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; refusing to overwrite a saved checkpoint (pass overwrite)")
    staging = path.with_name(path.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with _process_local_checkpointer() as checkpointer:
        checkpointer.save(staging / "params", jax.tree.map(np.asarray, jax.device_get(params)))
    meta = {"model": kind, "config": mc.to_dict(config), "scan": bool(scan)}
    (staging / "model_config.json").write_text(json.dumps(meta, indent=2))
    if tokenizer_dir:
        shutil.copytree(tokenizer_dir, staging / "tokenizer")
    if path.exists():
        shutil.rmtree(path)
    staging.rename(path)
    return path


def _process_local_checkpointer() -> ocp.StandardCheckpointer:
    """A model file holds plain host arrays: the one process that writes it (or each that reads it) works alone,
    without the cross-process barriers Orbax otherwise expects every process of a multi-host job to join."""
    me = jax.process_index()
    only_me = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.StandardCheckpointer(multiprocessing_options=only_me)


def read_model_config(path):
    """(kind, config, scan) from CKPT/model_config.json, with a clear error for a directory that is not one."""
    meta_path = Path(path) / "model_config.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} is not a cxrllava-jax checkpoint: {meta_path.name} is missing")
    meta = json.loads(meta_path.read_text())
    kind = meta.get("model")
    if kind not in CONFIG_CLASSES:
        raise InputError(f"{meta_path}: unknown model kind {kind!r}; known: {sorted(CONFIG_CLASSES)}")
    return kind, mc.from_dict(CONFIG_CLASSES[kind], meta["config"]), bool(meta.get("scan", False))


def load_model(path, runtime: mc.Runtime = mc.Runtime()):
    """(kind, config, params as numpy) in the layer layout `runtime.scan` asks for."""
    kind, config, _ = read_model_config(path)
    with _process_local_checkpointer() as checkpointer:
        params = checkpointer.restore(Path(path).absolute() / "params")
    return kind, config, relayout(params, scan=runtime.scan)


def tokenizer_dir(path) -> Path | None:
    candidate = Path(path) / "tokenizer"
    return candidate if candidate.is_dir() else None
