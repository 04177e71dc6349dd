"""The whole CXR-LLaVA through the converters: a tiny checkpoint in the release's exact layout, written
from PyTorch, imported with `cxrllava import-torch`, gives the release forward's logits; exporting it
back (release layout, bf16 and fp32) is exact and round-trips bit for bit; the `hf-llama` export loads in
transformers with equal logits; tokenizer files travel along."""

import dataclasses
import json
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file

from cxrllava_jax import cli
from cxrllava_jax.convert import checkpoint
from cxrllava_jax.models.configs import CXR_LLAVA_PRESETS, Runtime
from cxrllava_jax.models.cxr_llava import CXRLLaVAModel
from cxrllava_jax.models.llama import Llama
from cxrllava_jax.reference.torch_models import IMAGE_PLACEHOLDER, ReleaseCXRLLaVA, randomize_, save_release_dir

TOL = 1e-4
BASE = CXR_LLAVA_PRESETS["cxr_llava_tiny"]
CONFIG = dataclasses.replace(BASE, image_mean=0.4, image_std=0.3,
                             llama=dataclasses.replace(BASE.llama, rope_theta=2000.0, rms_norm_eps=1e-6))
# Two prompts of different lengths, each with one `<image>` placeholder as the release tokenizes it.
PROMPTS = [[1, 29, 30, IMAGE_PLACEHOLDER, 31, 32, 33], [1, 40, IMAGE_PLACEHOLDER, 41, 42, 43, 44, 45, 46, 47]]
TOKENIZER_FILES = {"tokenizer.model": bytes(range(256)) * 3,
                   "tokenizer_config.json": b'{"chat_template": "[INST] {{ messages }} [/INST]"}',
                   "generation_config.json": b'{"temperature": 0.2, "top_p": 0.8}'}


def run_cli(*argv):
    assert cli.main([str(a) for a in argv]) == 0


def read_tensors(directory) -> dict:
    index = json.loads((Path(directory) / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for name in sorted(set(index.values())):
        with safe_open(str(Path(directory) / name), framework="numpy") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(PyTorch reference, release directory, our imported checkpoint)."""
    torch.manual_seed(0)
    reference = randomize_(ReleaseCXRLLaVA(CONFIG), seed=1)
    src = save_release_dir(reference, CONFIG, tmp_path_factory.mktemp("release"), num_shards=3)
    for name, content in TOKENIZER_FILES.items():
        (src / name).write_bytes(content)
    ckpt = tmp_path_factory.mktemp("ckpt") / "model"
    run_cli("import-torch", "--src", src, "--out", ckpt)
    return reference, src, ckpt


@pytest.fixture(scope="module")
def images():
    size = CONFIG.vision.image_size
    return np.random.RandomState(3).randn(len(PROMPTS), size, size, 1).astype(np.float32)


def expand_and_left_pad(prompts, num_image_tokens):
    """Our token layout: the placeholder becomes num_image_tokens image positions; rows left-padded."""
    rows = [np.concatenate([[t] * num_image_tokens if t == IMAGE_PLACEHOLDER else [t] for t in p]) for p in prompts]
    width = max(map(len, rows))
    tokens = np.stack([np.pad(r, (width - len(r), 0)) for r in rows]).astype(np.int32)
    valid = np.stack([np.arange(width) >= width - len(r) for r in rows])
    return tokens, valid


def test_import_reads_the_release_config(release):
    kind, config, _ = checkpoint.read_model_config(release[2])
    assert (kind, config) == ("cxr_llava", CONFIG)


def test_imported_model_matches_the_release_forward(release, images):
    reference, _, ckpt = release
    kind, config, params = checkpoint.load_model(ckpt)
    tokens, valid = expand_and_left_pad(PROMPTS, config.num_image_tokens)
    logits = np.asarray(jax.jit(CXRLLaVAModel(config).apply)({"params": params}, images, tokens, valid)[0])
    for i, prompt in enumerate(PROMPTS):  # the release runs one image at a time
        with torch.no_grad():
            expected = reference(torch.as_tensor(images[i:i + 1]).permute(0, 3, 1, 2),
                                 torch.as_tensor([prompt])).numpy()[0]
        assert expected.shape[0] == len(prompt) - 1 + config.num_image_tokens
        assert np.abs(expected).max() > 1.0
        np.testing.assert_allclose(logits[i, valid[i]], expected, atol=TOL, rtol=0)


def test_scanned_import_holds_the_same_weights(release, tmp_path):
    run_cli("import-torch", "--src", release[1], "--out", tmp_path / "scanned", "--scan")
    assert checkpoint.read_model_config(tmp_path / "scanned")[2] is True
    unrolled = checkpoint.load_model(release[2], Runtime(scan=False))[2]
    restacked = checkpoint.load_model(tmp_path / "scanned", Runtime(scan=False))[2]
    jax.tree.map(np.testing.assert_array_equal, restacked, unrolled)


def test_tokenizer_files_travel_with_the_checkpoint(release):
    stored = checkpoint.tokenizer_dir(release[2])
    assert {p.name: p.read_bytes() for p in stored.iterdir()} == TOKENIZER_FILES


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_release_export_is_exact_and_round_trips_bit_for_bit(release, dtype, tmp_path):
    reference, src, ckpt = release
    flag = [] if dtype == "bfloat16" else ["--dtype", dtype]  # bf16 is the default, as released
    run_cli("export-torch", "--checkpoint", ckpt, "--out", tmp_path / "first", "--max-shard-size", "40KB", *flag)
    run_cli("import-torch", "--src", tmp_path / "first", "--out", tmp_path / "reimported")
    run_cli("export-torch", "--checkpoint", tmp_path / "reimported", "--out", tmp_path / "second", *flag)
    first, second = read_tensors(tmp_path / "first"), read_tensors(tmp_path / "second")
    assert len(list((tmp_path / "first").glob("model-*-of-*.safetensors"))) > 1  # really sharded
    assert sorted(first) == sorted(second) == sorted(reference.state_dict())
    for key, tensor in first.items():
        assert tensor.dtype == np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32), key
        assert tensor.shape == second[key].shape and tensor.tobytes() == second[key].tobytes(), key
        # Exact against the PyTorch weights themselves (torch rounds to bf16 the same way: nearest even).
        expected = reference.state_dict()[key].to(getattr(torch, dtype)).view(torch.int16 if dtype == "bfloat16"
                                                                              else torch.int32)
        assert tensor.tobytes() == expected.numpy().tobytes(), key
    assert json.loads((tmp_path / "first" / "config.json").read_text()) == \
        json.loads((tmp_path / "second" / "config.json").read_text())
    for name, content in TOKENIZER_FILES.items():
        assert (tmp_path / "first" / name).read_bytes() == content


def test_release_export_loads_into_the_pytorch_release_model(release, images, tmp_path):
    reference, _, ckpt = release
    run_cli("export-torch", "--checkpoint", ckpt, "--out", tmp_path / "out", "--dtype", "float32")
    exported = {}
    for shard in (tmp_path / "out").glob("*.safetensors"):
        exported.update(load_file(shard))
    rebuilt = ReleaseCXRLLaVA(CONFIG).eval()
    rebuilt.load_state_dict(exported, strict=True)
    pixels, prompt = torch.as_tensor(images[:1]).permute(0, 3, 1, 2), torch.as_tensor([PROMPTS[0]])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(pixels, prompt), reference(pixels, prompt), rtol=0, atol=0)


def test_hf_llama_export_loads_in_transformers_with_equal_logits(release, tmp_path):
    _, _, ckpt = release
    run_cli("export-torch", "--checkpoint", ckpt, "--out", tmp_path / "hf", "--layout", "hf-llama",
            "--dtype", "float32")
    hf_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf_model.config.rope_parameters["rope_theta"] == CONFIG.llama.rope_theta
    _, config, params = checkpoint.load_model(ckpt)
    tokens = np.random.RandomState(4).randint(3, config.llama.vocab_size, (2, 9)).astype(np.int32)
    ours = np.asarray(Llama(config.llama).apply({"params": params["llm"]}, tokens)[0])
    with torch.no_grad():
        expected = hf_model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, expected, atol=TOL, rtol=0)
    for name, content in TOKENIZER_FILES.items():
        assert (tmp_path / "hf" / name).read_bytes() == content
