"""Our model checkpoint: what every stage exports, what import-torch writes and what inference loads.

    CKPT/model_config.json   {"model": kind, "config": {...}, "scan": bool,
                              "quantize": null or {"kind": "int8"|"int4", "param_dtype": ...}}
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

CONFIG_CLASSES = {
    "cxr_llava": mc.CXRLLaVAConfig, "llama": mc.LlamaConfig, "bert": mc.BertConfig, "vit": mc.VisionConfig,
    "vit_classifier": mc.VisionConfig, "contrastive": mc.ContrastiveConfig,
}


def save_model(path, kind: str, config, params, *, tokenizer_dir=None, scan: bool = False, overwrite: bool = False,
               quantize: dict | None = None):
    """Writes a model checkpoint; an existing one is replaced only with `overwrite` (and only once the new
    one is complete: it is written beside and swapped in, so a crash never leaves neither). `quantize` records
    that the language model's weights are quantized ones ({"kind": "int8"|"int4", "param_dtype": the dtype of
    the others}; see `inference.quantize`)."""
    path = Path(path).absolute()
    if kind not in CONFIG_CLASSES:
        raise ValueError(f"unknown model kind {kind!r}; known: {sorted(CONFIG_CLASSES)}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; refusing to overwrite a saved checkpoint (pass overwrite)")
    staging = path.with_name(path.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with _host_array_writer() as checkpointer:
        host = jax.tree.map(np.asarray, jax.device_get(params))
        checkpointer.save(staging / "params", args=ocp.args.PyTreeSave(host))
    meta = {"model": kind, "config": mc.to_dict(config), "scan": bool(scan), "quantize": quantize}
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


def _host_array_writer() -> ocp.Checkpointer:
    """Writes host arrays where they lie. Orbax's default (asynchronous, `deepcopy_host_arrays`) first copies
    every numpy array, a second copy of a 7B model on the host; this write blocks until done, so nothing can
    change the arrays under it. The files are the same as `StandardCheckpointer` writes."""
    me = jax.process_index()
    only_me = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)))
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, multiprocessing_options=only_me)
    return ocp.Checkpointer(handler, multiprocessing_options=only_me)


def read_model_config(path):
    """(kind, config, scan) from CKPT/model_config.json, with a clear error for a directory that is not one."""
    meta_path = Path(path) / "model_config.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} is not a cxrllava-jax checkpoint: {meta_path.name} is missing")
    meta = json.loads(meta_path.read_text())
    kind = meta.get("model")
    if kind not in CONFIG_CLASSES:
        raise ValueError(f"{meta_path}: unknown model kind {kind!r}; known: {sorted(CONFIG_CLASSES)}")
    return kind, mc.from_dict(CONFIG_CLASSES[kind], meta["config"]), bool(meta.get("scan", False))


def read_quantization(path) -> dict | None:
    return json.loads((Path(path) / "model_config.json").read_text()).get("quantize")


def restore_params(path, abstract):
    """The parameter tree restored into the structure, dtypes and placement of `abstract` (ShapeDtypeStructs
    with shardings): what a quantized checkpoint needs, whose leaves only its model's template describes."""
    with _process_local_checkpointer() as checkpointer:
        return checkpointer.restore(Path(path).absolute() / "params", abstract)


def load_model(path, runtime: mc.Runtime = mc.Runtime()):
    """(kind, config, params as numpy) in the layer layout `runtime.scan` asks for."""
    kind, config, _ = read_model_config(path)
    with _process_local_checkpointer() as checkpointer:
        params = checkpointer.restore(Path(path).absolute() / "params")
    return kind, config, relayout(params, scan=runtime.scan)


def tokenizer_dir(path) -> Path | None:
    candidate = Path(path) / "tokenizer"
    return candidate if candidate.is_dir() else None
