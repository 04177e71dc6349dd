"""`eval.py --metrics=...`: the field's model-based metrics through RadEval, end to end offline on tiny models written
in the metrics' own formats (tests/metric_models.py), and clean one-line refusals for what is missing."""

import dataclasses
import importlib.util
import io
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from cxrllava_jax.evaluation import model_metrics
from tests import metric_models

ROOT = Path(__file__).parents[1]
REPORTS = ["The heart is enlarged.", "Small left pleural effusion.", "The lungs are clear, no pneumothorax."]


def _eval_py(tmp_path, metrics, env):
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text("".join(json.dumps({"id": str(i), "generated": r, "reference": r}) + "\n"
                                   for i, r in enumerate(REPORTS)))
    return subprocess.run(
        [sys.executable, "eval.py", "--config=configs/eval_mimic.py", f"--predictions={predictions}",
         f"--workdir={tmp_path / 'work'}", "--config.bootstrap_samples=10", f"--metrics={metrics}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, **env})


def test_chexbert_bertscore_radgraph_radcliq_end_to_end_on_tiny_models(tmp_path):
    pytest.importorskip("radeval", reason="the optional extra: pip install 'cxrllava-jax[metrics]'")
    hub, xdg = tmp_path / "hub", tmp_path / "xdg"
    # CheXbert's heads answer by their position: Cardiomegaly positive, Edema uncertain (positive in F1), the rest
    # negative. A head read in the wrong order moves the 1.0s to other findings.
    metric_models.write_chexbert(hub, xdg, {"Cardiomegaly": metric_models.POSITIVE, "Edema": metric_models.UNCERTAIN})
    metric_models.write_bertscore_models(hub)
    for model_type in ("radgraph-xl", "radgraph"):  # RadGraph F1 reads the XL model, RadCliQ the original
        metric_models.write_radgraph(hub, xdg, model_type)
    completed = _eval_py(tmp_path, "chexbert,bertscore,radgraph,radcliq",
                         {"HF_HUB_CACHE": str(hub), "XDG_CACHE_HOME": str(xdg), "HF_HUB_OFFLINE": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((tmp_path / "work" / "results.json").read_text())["model_metrics"]
    chexbert = results["chexbert"]
    per_finding = chexbert["f1chexbert_label_scores_f1"]["f1chexbert_all"]
    assert {f for f, f1 in per_finding.items() if f1 == 1.0} == {"Cardiomegaly", "Edema"}
    assert chexbert["f1chexbert_5_micro_f1"] == 1.0 and chexbert["f1chexbert_5_macro_f1"] == pytest.approx(2 / 5)
    assert chexbert["f1chexbert_all_macro_f1"] == pytest.approx(2 / 14)
    # Every generated report equals its reference: BERTScore (rescaled by its baseline) and RadGraph F1 are 1.
    assert results["bertscore"]["bertscore"] == pytest.approx(1.0, abs=1e-4)
    assert results["radgraph"] == {"radgraph_simple": 1.0, "radgraph_partial": 1.0, "radgraph_complete": 1.0}
    assert math.isfinite(results["radcliq"]["radcliq_v1"])
    assert "Model-based metrics (RadEval): f1chexbert_5_micro_f1 1.0000" in completed.stdout


def test_a_missing_requirement_is_one_line(tmp_path):
    empty = {"HF_HUB_CACHE": str(tmp_path / "hub"), "XDG_CACHE_HOME": str(tmp_path / "xdg"), "HF_HUB_OFFLINE": "1"}
    completed = _eval_py(tmp_path, "bertscore", empty)
    assert completed.returncode == 1 and not (tmp_path / "work" / "results.json").exists()
    assert completed.stderr.strip().splitlines()[-1] in (
        "eval.py: --metrics needs RadEval: pip install 'cxrllava-jax[metrics]'",
        "eval.py: --metrics=bertscore needs distilbert-base-uncased in the Hugging Face cache: "
        "hf download distilbert-base-uncased")
    assert "Traceback" not in completed.stderr


def test_refusals_name_what_to_install_or_download(tmp_path, monkeypatch):
    pytest.importorskip("radeval", reason="the optional extra: pip install 'cxrllava-jax[metrics]'")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    metric_models.hub_model(tmp_path / "hub", "bert-base-uncased", {"config.json": "{}"})
    checkpoint = tmp_path / "xdg" / "chexbert"
    with pytest.raises(model_metrics.MetricUnavailable, match=(
            f"^--metrics=chexbert needs StanfordAIMI/RRG_scorers/chexbert.pth in {checkpoint}: "
            f"hf download StanfordAIMI/RRG_scorers chexbert.pth --cache-dir {checkpoint}$")):
        model_metrics.check(("chexbert",))
    with pytest.raises(model_metrics.MetricUnavailable, match="radgraph-xl.tar.gz in .*radgraph/0.1.18"):
        model_metrics.check(("radgraph",))
    # The archive there (not yet unpacked): the transformer its configuration names is checked too.
    config = json.dumps({"dataset_reader": {"token_indexers": {"bert": {"model_name": "some/biomed-bert"}}}}).encode()
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        member = tarfile.TarInfo("./config.json")
        member.size = len(config)
        tar.addfile(member, io.BytesIO(config))
    metric_models.hub_model(tmp_path / "xdg" / "radgraph" / "0.1.18", "StanfordAIMI/RRG_scorers",
                            {"radgraph-xl.tar.gz": archive.getvalue()})
    with pytest.raises(model_metrics.MetricUnavailable, match="^--metrics=radgraph needs some/biomed-bert in the "
                                                              "Hugging Face cache: hf download some/biomed-bert$"):
        model_metrics.check(("radgraph",))
    cpu_only_green = dataclasses.replace(model_metrics.METRICS["green"], packages=())
    monkeypatch.setitem(model_metrics.METRICS, "green", cpu_only_green)
    import torch

    missing = "GREEN-radllama2-7b in the Hugging Face cache" if torch.cuda.is_available() else "needs a CUDA GPU"
    with pytest.raises(model_metrics.MetricUnavailable, match=missing):
        model_metrics.check(("green",))
    with pytest.raises(model_metrics.MetricUnavailable, match="unknown bleurt; choose from radgraph, bertscore"):
        model_metrics.parse("bertscore,bleurt")
    with pytest.raises(model_metrics.MetricUnavailable, match="config.answer_kind=json_labels has none"):
        model_metrics.parse("bertscore", "json_labels")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "radeval" else real_find_spec(name))
    with pytest.raises(model_metrics.MetricUnavailable, match=r"pip install 'cxrllava-jax\[metrics\]'"):
        model_metrics.check(("bertscore",))
