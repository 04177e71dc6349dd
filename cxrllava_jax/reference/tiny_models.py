"""Tiny CXR-LLaVA models for the inference tests, the notebook test and the inference benchmark.

Built once and cached on disk, keyed on everything they are built from (the sources of this library and of
its data code, and the versions of the packages that write them), so an edit anywhere rebuilds them; each is
written beside and renamed into place so that processes running at the same time never see half a model:
- a LLaMA-style SentencePiece tokenizer trained on synthetic reports and the prompts;
- `release_dir()`: a release-layout PyTorch directory (`torch_models.ReleaseCXRLLaVA` with random
  weights, float32 safetensors, config.json, the tokenizer files), the thing users download;
- `checkpoint_dir()`: the same weights imported into our checkpoint with the tokenizer under tokenizer/;
- `small_release_dir()`: a release-layout directory whose language model is a 4-layer, 256-wide LLaMA with
  LLaMA-2's tokenizer (vocabulary 32,000): still small enough for a CPU, but one where decoding, not the
  work around it, is most of a request's cost (the serving benchmark's second model); with `image_size=512`, the
  release's 1,024 image positions (the engine benchmark's model).
"""

import dataclasses
import functools
import hashlib
import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from cxrllava_jax.convert import checkpoint, release
from cxrllava_jax.domain import prompting
from cxrllava_jax.domain.tokenizer import load_tokenizer, train_tokenizer
from cxrllava_jax.models.configs import CXR_LLAVA_PRESETS
from input_pipeline import synthetic
from cxrllava_jax.reference.torch_models import ReleaseCXRLLaVA, randomize_, save_release_dir

TOKENIZER_VOCAB = 512
LLAMA2_TOKENIZER = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "llama2-tokenizer"
SMALL_LLAMA = dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=8,
                   num_kv_heads=8)


def _sources_key() -> str:
    """A digest of what the models are built from: every library and data module, and the writers' versions."""
    repo = Path(__file__).resolve().parents[2]
    digest = hashlib.sha1()
    for path in sorted(p for top in ("cxrllava_jax", "input_pipeline") for p in (repo / top).rglob("*.py")):
        digest.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes())
    for package in ("torch", "transformers", "sentencepiece", "safetensors", "numpy"):
        digest.update(f"{package}=={importlib.metadata.version(package)}".encode())
    return digest.hexdigest()[:12]


_ROOT = Path(tempfile.gettempdir()) / f"cxrllava-inference-fixtures-{_sources_key()}"


def synthetic_texts(num_studies: int = 300, seed: int = 0) -> list[str]:
    """Reports, instruction turns and the prompts: what the tiny tokenizer learns its pieces from."""
    rng = np.random.default_rng(seed)
    texts = [prompting.SYSTEM_PROMPT]
    for _ in range(num_studies):
        findings = synthetic.sample_findings(rng)
        report, _ = synthetic.write_report(findings, rng)
        texts.append(report)
        texts += [turn["content"] for c in synthetic.write_conversations(findings, report, rng) for turn in c]
    return texts


def tiny_config(vocab_size: int):
    base = CXR_LLAVA_PRESETS["cxr_llava_tiny"]
    return dataclasses.replace(base, llama=dataclasses.replace(base.llama, vocab_size=vocab_size))


@functools.cache
def tokenizer_dir() -> Path:
    return _built("tokenizer", lambda out: train_tokenizer(synthetic_texts(), TOKENIZER_VOCAB, out))


@functools.cache
def release_dir() -> Path:
    def build(out):
        config = tiny_config(len(load_tokenizer(tokenizer_dir())))
        torch.manual_seed(0)
        model = randomize_(ReleaseCXRLLaVA(config), seed=3)
        save_release_dir(model, config, out, num_shards=2)
        for f in tokenizer_dir().iterdir():
            shutil.copy(f, out / f.name)

    return _built("release", build)


@functools.cache
def small_release_dir(image_size: int | None = None) -> Path:
    """`image_size` 512: the release's 1,024 image positions (the tiny, narrow vision tower's patch of 16 over a
    512-pixel image) and a context of 2,048, as a conversation about one radiograph needs."""

    def build(out):
        base = CXR_LLAVA_PRESETS["cxr_llava_tiny"]
        llama = dataclasses.replace(base.llama, **SMALL_LLAMA)
        vision = base.vision
        if image_size is not None:
            vision = dataclasses.replace(vision, image_size=image_size)
            llama = dataclasses.replace(llama, max_position_embeddings=2048)
        config = dataclasses.replace(base, llama=llama, vision=vision)
        torch.manual_seed(0)
        save_release_dir(randomize_(ReleaseCXRLLaVA(config), seed=5), config, out, num_shards=2)
        shutil.copy(LLAMA2_TOKENIZER / "tokenizer.model", out / "tokenizer.model")

    return _built("small-release" if image_size is None else f"small-release-{image_size}", build)


@functools.cache
def checkpoint_dir() -> Path:
    def build(out):
        config, params = release.load_release(release_dir())
        checkpoint.save_model(out, "cxr_llava", config, params, tokenizer_dir=tokenizer_dir())

    return _built("checkpoint", build)


def synthetic_radiograph(path, seed: int, size: int = 96) -> Path:
    """A drawn chest radiograph (8-bit PNG) with a random finding or none."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(synthetic.draw_radiograph(synthetic.sample_findings(rng), size, rng)).save(path)
    return Path(path)


def _built(name: str, build) -> Path:
    final = _ROOT / name
    if final.is_dir():
        return final
    _ROOT.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=_ROOT))
    # save_model refuses an existing directory and writes beside it: build into a fresh child.
    build(staging / "out")
    try:
        os.rename(staging / "out", final)
    except OSError:  # another process finished first; theirs is as good as ours
        pass
    shutil.rmtree(staging, ignore_errors=True)
    return final


def hub_cache(cache: Path, repo_id: str, source: Path, revision: str = "main") -> Path:
    """Writes `source`'s files into the Hugging Face cache at `cache` as `huggingface_hub` lays out a download of
    `repo_id` (blobs named by content hash, `snapshots/COMMIT/` linking to them, `refs/REVISION` naming COMMIT),
    so that `HF_HUB_OFFLINE=1` resolves the id with no network. Returns the snapshot directory."""
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    digest = hashlib.sha1(repo_id.encode())
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(source)).encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    commit = digest.hexdigest()
    snapshot = repo / "snapshots" / commit
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot
