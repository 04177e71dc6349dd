"""The labeler choices of eval.py and `cxrllava label`: labels made elsewhere, and CheXbert's clear refusals."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cxrllava_jax import errors
from cxrllava_jax.cli import main as cxrllava
from cxrllava_jax.domain.label_files import read_labels_csv
from cxrllava_jax.evaluation import labelers

ROOT = Path(__file__).parents[1]
SAMPLES = Path(__file__).parent / "fixtures" / "chexpert-labeler-samples"


def test_chexpert_csv_labels_the_published_samples_as_the_chexpert_labeler_did(tmp_path):
    out = tmp_path / "labels.csv"
    assert cxrllava(["label", "--reports", str(SAMPLES / "sample_reports.csv"), "--out", str(out),
                     "--labeler", "chexpert-csv", "--labels-csv", str(SAMPLES / "labeled_reports.csv")]) == 0
    assert out.read_text() == (SAMPLES / "labeled_reports.csv").read_text().rstrip("\n") + "\n"


def test_chexpert_csv_names_a_report_it_has_no_labels_for(tmp_path, capsys):
    reports = tmp_path / "reports.csv"
    reports.write_text("Heart size normal and lungs are clear. No edema or pneumonia. No effusion\nNew report.\n")
    code = cxrllava(["label", "--reports", str(reports), "--out", str(tmp_path / "out.csv"),
                     "--labeler", "chexpert-csv", "--labels-csv", str(SAMPLES / "labeled_reports.csv")])
    assert code == errors.EXIT_ERROR
    assert "no labels for 1 of 2 reports, e.g. 'New report.'" in capsys.readouterr().err


def test_eval_py_with_chexpert_csv_labels_says_which_labeler(tmp_path):
    table = read_labels_csv(SAMPLES / "labeled_reports.csv")
    records = [{"id": f"s{i}", "generated": table.reports[(i + 1) % 4], "reference": table.reports[i]}
               for i in range(4)]
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    completed = _eval_py(tmp_path, f"--predictions={predictions}", "--labeler=chexpert-csv",
                         f"--labels_csv={SAMPLES / 'labeled_reports.csv'}")
    assert completed.returncode == 0, completed.stderr
    results = json.loads((tmp_path / "work" / "results.json").read_text())
    assert results["labeler"] == "chexpert-csv (labeled_reports.csv)"
    assert results["reference_label_counts"]["Cardiomegaly"] == {
        "positive": 2, "negative": 1, "uncertain": 0, "not_mentioned": 1}
    assert "labels by chexpert-csv (labeled_reports.csv)" in completed.stdout


def test_chexbert_without_a_checkpoint_is_a_clear_error(tmp_path):
    completed = _eval_py(tmp_path, f"--predictions={tmp_path / 'p.jsonl'}", "--labeler=chexbert",
                         f"--chexbert_checkpoint={tmp_path / 'chexbert.pth'}")
    assert completed.returncode != 0
    assert "chexbert.pth: does not exist" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_chexbert_without_the_package_is_a_clear_error(tmp_path, monkeypatch, capsys):
    checkpoint = tmp_path / "chexbert.pth"
    checkpoint.write_bytes(b"not used: the package is missing first")
    monkeypatch.setitem(sys.modules, "f1chexbert", None)  # as if not installed, whether or not it is
    with pytest.raises(labelers.LabelerUnavailable, match=r"needs the f1chexbert package \(pip install f1chexbert\)"):
        labelers.make("chexbert", chexbert_checkpoint=checkpoint)
    code = cxrllava(["label", "--reports", str(SAMPLES / "sample_reports.csv"), "--out", str(tmp_path / "o.csv"),
                     "--labeler", "chexbert", "--chexbert-checkpoint", str(checkpoint)])
    assert code == errors.EXIT_ERROR and "f1chexbert" in capsys.readouterr().err


def _eval_py(tmp_path, *flags):
    return subprocess.run(
        [sys.executable, "eval.py", "--config=configs/eval_mimic.py", f"--workdir={tmp_path / 'work'}",
         "--config.bootstrap_samples=20", *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
