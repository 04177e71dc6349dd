"""Our model checkpoint: what every stage exports, what import-torch writes and what inference loads.

    CKPT/model_config.json   {"model": kind, "config": {...}, "scan": bool,
                              "quantize": null or {"kind": "int8"|"int4", "param_dtype": ...},
                              "tokenizer_fingerprint": "sha256:..." (language models with a tokenizer)}
    CKPT/params/             the parameter tree, written by Orbax
    CKPT/tokenizer/          optional: the tokenizer files that go with the language model

Kinds: 'cxr_llava', 'llama', 'bert', 'vit', 'vit_classifier' (stage 1A), 'contrastive' (stage 1B).

Loading checks identity, not just sizes: the parameters' shapes against model_config.json, and (for language
models saved with a tokenizer) the tokenizer's vocabulary against the fingerprint recorded when it was saved.
"""

import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from cxrllava_jax import files
from cxrllava_jax.convert.layout import relayout
from cxrllava_jax.errors import InputError, MismatchError
from cxrllava_jax.models import configs as mc

LANGUAGE_MODEL_KINDS = ("cxr_llava", "llama")
CONFIG_CLASSES = {
    "cxr_llava": mc.CXRLLaVAConfig, "llama": mc.LlamaConfig, "bert": mc.BertConfig, "vit": mc.VisionConfig,
    "vit_classifier": mc.VisionConfig, "contrastive": mc.ContrastiveConfig,
}


# What a checkpoint directory holds; other files in it (notes, a model card) are kept when it is replaced.
ENTRIES = ("model_config.json", "params", "tokenizer")


def save_model(path, kind: str, config, params, *, tokenizer_dir=None, scan: bool = False, overwrite: bool = False,
               quantize: dict | None = None):
    """Writes a model checkpoint; an existing one is replaced only with `overwrite` (and only once the new
    one is complete: it is written beside and swapped in, `files.staged_directory`). `quantize` records
    that the language model's weights are quantized ones ({"kind": "int8"|"int4", "param_dtype": the dtype of
    the others}; see `models.quantize`)."""
    if kind not in CONFIG_CLASSES:
        raise ValueError(f"unknown model kind {kind!r}; known: {sorted(CONFIG_CLASSES)}")
    with files.staged_directory(path, overwrite, owns=ENTRIES) as staging:
        with _host_array_writer() as checkpointer:
            host = jax.tree.map(np.asarray, jax.device_get(params))
            checkpointer.save(staging / "params", args=ocp.args.PyTreeSave(host))
        meta = {"model": kind, "config": mc.to_dict(config), "scan": bool(scan), "quantize": quantize}
        if tokenizer_dir and kind in LANGUAGE_MODEL_KINDS:
            fingerprint = tokenizer_fingerprint_of(tokenizer_dir)
            if fingerprint:
                meta["tokenizer_fingerprint"] = fingerprint
        (staging / "model_config.json").write_text(json.dumps(meta, indent=2))
        if tokenizer_dir:
            shutil.copytree(tokenizer_dir, staging / "tokenizer")
    return Path(os.path.abspath(path))


def tokenizer_fingerprint_of(directory) -> str | None:
    """A hash of the vocabulary of a LLaMA tokenizer directory: its pieces in id order, from tokenizer.model
    (what the tokenizer loads first) or else tokenizer.json. Two tokenizers of the same size share it only if every
    id means the same piece. None for files that hold no readable vocabulary (loading them fails anyway)."""
    import sentencepiece as spm

    directory = Path(directory)
    try:
        if (directory / "tokenizer.model").is_file():
            model = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
            pieces = [model.id_to_piece(i) for i in range(model.get_piece_size())]
        elif (directory / "tokenizer.json").is_file():
            vocabulary = files.read_json(directory / "tokenizer.json")["model"]["vocab"]
            pieces = sorted(vocabulary, key=vocabulary.get) if isinstance(vocabulary, dict) else vocabulary
        else:
            return None
    except Exception:  # noqa: BLE001 - an unreadable file has no vocabulary to record
        return None
    return "sha256:" + hashlib.sha256(json.dumps(pieces, ensure_ascii=False).encode("utf-8")).hexdigest()


def content_fingerprint(path, sample_bytes: int = 1 << 20) -> str:
    """A fingerprint of a model directory's (or file's) content, cheap for 14 GB of weights: every file's relative
    path and size, and its first, middle and last `sample_bytes`. Retrained, converted or damaged weights change
    it; the same files copied elsewhere keep it."""
    path = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path) if file != path else file.name}\0{size}\0".encode())
        with open(file, "rb") as handle:
            for offset in sorted({0, max(0, size // 2 - sample_bytes // 2), max(0, size - sample_bytes)}):
                handle.seek(offset)
                digest.update(handle.read(sample_bytes))
    return "sha256:" + digest.hexdigest()[:16]


def check_tokenizer(tokenizer_dir, checkpoint_path):
    """Refuses a tokenizer directory whose vocabulary is not the one the checkpoint was saved with."""
    recorded = tokenizer_fingerprint(checkpoint_path)
    found = tokenizer_fingerprint_of(tokenizer_dir)
    if recorded and found != recorded:
        raise MismatchError(f"{tokenizer_dir}: this tokenizer's vocabulary ({str(found)[:19]}) is not the one "
                            f"{checkpoint_path} was saved with ({recorded[:19]}); use the tokenizer files that came "
                            "with the checkpoint")


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
    """(kind, config, scan) from CKPT/model_config.json. A directory that is not a checkpoint, or a file that
    cannot be read, is an InputError naming it; a config whose fields are not those of the model it names (e.g.
    "model": "bert" over a CXR-LLaVA config) is a MismatchError naming both."""
    meta_path, meta = _read_meta(path)
    kind = meta.get("model")
    if kind not in CONFIG_CLASSES:
        raise InputError(f"{meta_path}: unknown model kind {kind!r}; known: {sorted(CONFIG_CLASSES)}")
    if not isinstance(meta.get("config"), dict):
        raise InputError(f"{meta_path}: no \"config\" object (the model's hyper-parameters)")
    try:
        config = mc.from_dict(CONFIG_CLASSES[kind], meta["config"])
    except (TypeError, ValueError) as error:
        raise MismatchError(f"{meta_path}: its \"config\" is not that of the {kind!r} model it names: "
                            f"{error}") from error
    return kind, config, bool(meta.get("scan", False))


def read_quantization(path) -> dict | None:
    return _read_meta(path)[1].get("quantize")


def _read_meta(path) -> tuple[Path, dict]:
    meta_path = Path(path) / "model_config.json"
    if not Path(path).is_dir():
        raise InputError(f"{path}: no such checkpoint directory" if not Path(path).exists() else
                         f"{path} is a file; give the checkpoint's directory")
    if not meta_path.is_file():
        raise InputError(f"{path} is not a cxrllava-jax checkpoint: {meta_path.name} is missing")
    meta = files.read_json(meta_path)
    if not isinstance(meta, dict):
        raise InputError(f"{meta_path}: not a JSON object but {type(meta).__name__}")
    return meta_path, meta


def restore_params(path, abstract):
    """The parameter tree restored into the structure, dtypes and placement of `abstract` (ShapeDtypeStructs
    with shardings): what a quantized checkpoint needs, whose leaves only its model's template describes."""
    drop_closed_loop_echoes()
    with _process_local_checkpointer() as checkpointer:
        return checkpointer.restore(Path(path).absolute() / "params", abstract)


def drop_closed_loop_echoes():
    """Call before an Orbax restore. Orbax reads the arrays concurrently in an asyncio loop of its own and closes
    it at the first failed read (a damaged file); the reads still in flight then complete into the closed loop,
    and TensorStore reports each as an unraisable "RuntimeError: Event loop is closed" traceback, 6 to 140 of them
    around the real error; asyncio logs the other failed reads' tasks as "Task exception was never retrieved".
    Those echoes are dropped from then on (before and after the restore returns: they arrive from TensorStore's
    threads and the garbage collector); other errors still show, and the real error is reported."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_echoes", False):
        return
    logging.getLogger("asyncio").addFilter(
        lambda record: not (str(record.msg).startswith("Task exception was never retrieved")
                            and "orbax" in record.getMessage()))

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_closed_loop_echoes = True
    sys.unraisablehook = hook


def load_model(path, runtime: mc.Runtime = mc.Runtime()):
    """(kind, config, params as numpy) in the layer layout `runtime.scan` asks for; parameters whose shapes do
    not fit model_config.json are refused, naming both."""
    kind, config, _ = read_model_config(path)
    params_dir = Path(path).absolute() / "params"
    try:
        drop_closed_loop_echoes()
        with _process_local_checkpointer() as checkpointer:
            params = checkpointer.restore(params_dir)
    except Exception as error:  # Orbax and TensorStore raise many types for missing or cut-off files
        raise InputError(f"{params_dir}: cannot read the parameters ({type(error).__name__}: "
                         f"{str(error).strip().splitlines()[0][:200] if str(error).strip() else ''}); "
                         "the checkpoint is incomplete or damaged") from error
    check_shapes(path, kind, config, relayout(params, scan=False))
    return kind, config, relayout(params, scan=runtime.scan)


def check_shapes(path, kind: str, config, params):
    """Compares unscanned `params` with the shapes `config` implies (for the kinds whose shapes we can derive)."""
    from cxrllava_jax.convert import hf_llama, open_clip, release

    derive = {"cxr_llava": release.release_expected_shapes, "llama": hf_llama.llama_expected_shapes,
              "vit": open_clip.vit_expected_shapes}.get(kind)
    if derive is None:
        return
    expected = derive(config)
    found = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    problems = [f"{k}: model_config.json implies {tuple(expected[k])}, params/ holds {found[k]}"
                for k in sorted(set(expected) & set(found)) if tuple(expected[k]) != found[k]]
    problems += [f"{k} missing from params/" for k in sorted(set(expected) - set(found))]
    problems += [f"{k} in params/ is not in the model" for k in sorted(set(found) - set(expected))]
    if problems:
        raise MismatchError(f"{path}: model_config.json does not describe its parameters ({len(problems)} "
                            f"problem(s)): {'; '.join(problems[:3])}")


def tokenizer_fingerprint(path) -> str | None:
    """The fingerprint of the tokenizer the checkpoint was saved with (None for older checkpoints or none)."""
    meta_path = Path(path) / "model_config.json"
    return _read_meta(path)[1].get("tokenizer_fingerprint") if meta_path.is_file() else None


def tokenizer_dir(path) -> Path | None:
    candidate = Path(path) / "tokenizer"
    return candidate if candidate.is_dir() else None
