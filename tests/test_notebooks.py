"""The Colab notebooks run top to bottom (nbclient, a kernel on this interpreter), offline, on tiny models."""

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from cxrllava_jax.reference.tiny_models import hub_cache, release_dir

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "colab").glob("*.ipynb"))
KERNEL = "cxrllava-tests"
RELEASE_ID = "ECOFRI/CXR-LLAVA-v2"  # what the notebooks load on Colab; here the tiny release under that id


def notebook_environment(name: str) -> dict:
    """What each notebook's parameters cell reads from the environment in place of Colab paths. The release's Hub
    id resolves offline from a Hugging Face cache holding the tiny release (HF_HUB_CACHE, HF_HUB_OFFLINE=1)."""
    if name == "inference.ipynb":
        # The release layout (the notebook converts it); short answers: a random tiny model's chat history
        # would soon overflow its 512-token context.
        return {"CXRLLAVA_CHECKPOINT": RELEASE_ID, "CXRLLAVA_MAX_NEW_TOKENS": "24"}
    if name == "training_demo.ipynb":  # every stage for one step: the code paths, not the learning
        # Its programs (the demo's sizes) are compiled for it alone and run a few times each: LLVM's optimisation
        # costs more than it saves (this test: 86 -> 72 CPU s). How XLA compiles, not what the notebook runs; the
        # device check's dry run does the same. (The other notebooks' tiny-release programs come from the tests'
        # shared compilation cache, compiled as the other tests compile them.)
        xla_flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
        return {"CXRLLAVA_DEMO_STUDIES": "100", "CXRLLAVA_DEMO_STEPS": "1", "XLA_FLAGS": xla_flags}
    if name == "finetune_lora.ipynb":  # the tiny release as the base, one step: the code paths
        return {"CXRLLAVA_BASE": RELEASE_ID, "CXRLLAVA_FT_STEPS": "1", "CXRLLAVA_FT_STUDIES": "40"}
    return {}


def test_the_inference_notebook_is_there():
    assert REPO / "colab" / "inference.ipynb" in NOTEBOOKS


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
    """A kernelspec for this very interpreter, so the test needs no kernel installed on the machine."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "cxrllava-jax tests", "language": "python"}))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path, kernel_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    hub_cache(tmp_path / "hf-cache", RELEASE_ID, release_dir())
    for key, value in notebook_environment(path.name).items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name=KERNEL, resources={"metadata": {"path": str(tmp_path)}}).execute()

    code_cells = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code_cells)
    if path.name == "inference.ipynb":
        printed = "".join(o.get("text", "") for c in code_cells for o in c.outputs)
        assert "imported release" in printed  # the release directory was converted to our checkpoint
        assert "models--ECOFRI--CXR-LLAVA-v2/snapshots/" in printed  # found by its Hub id, in the cache
        assert all(f"== sample_images/cxr{i}.png ==" in printed for i in range(4))  # the batch
        assert (tmp_path / "cxr-llava-jax" / "model_config.json").is_file()
    if path.name == "training_demo.ipynb":
        assert sorted(p.name for p in tmp_path.joinpath("demo_workdir").iterdir()) == [
            "1a", "1b_labels", "1b_reports", "2a", "2b", "data", "eval", "study_data", "tokenizer"]
        assert (tmp_path / "demo_workdir" / "eval" / "table.md").is_file()
    if path.name == "finetune_lora.ipynb":
        workdir = tmp_path / "finetune_workdir"
        assert (workdir / "run" / "adapter" / "adapter_model.safetensors").is_file()
        assert (workdir / "eval_before" / "table.md").is_file() and (workdir / "eval_after" / "table.md").is_file()
        assert (workdir / "export_release" / "config.json").is_file()
