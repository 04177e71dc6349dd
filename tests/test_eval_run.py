"""`eval.py --predictions` end to end, and the library functions behind it."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cxrllava_jax.errors import ConfigError
from cxrllava_jax.evaluation import run

ROOT = Path(__file__).parents[1]
FINDINGS = ("Cardiomegaly", "Pleural Effusion", "Pneumothorax")


def _report_records(n=60):
    """Reports that mention three findings in varied states; the 'model' gets some of them wrong."""
    phrases = {
        "Cardiomegaly": ("The heart is enlarged.", "Heart size is normal."),
        "Pleural Effusion": ("There is a small right pleural effusion.", "No pleural effusion."),
        "Pneumothorax": ("Small left apical pneumothorax.", "No pneumothorax."),
    }
    records = []
    for i in range(n):
        truth = [(i >> k) & 1 for k in range(3)]
        guess = [t if (i + k) % 5 else 1 - t for k, t in enumerate(truth)]
        text = lambda states: " ".join(phrases[f][0 if s else 1] for f, s in zip(FINDINGS, states))
        records.append({"id": f"s{i}", "generated": text(guess), "reference": text(truth)})
    return records


def test_eval_py_scores_a_predictions_file(tmp_path):
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text("\n".join(json.dumps(r) for r in _report_records()) + "\n")
    workdir = tmp_path / "work"
    completed = subprocess.run(
        [sys.executable, "eval.py", "--config=configs/eval_mimic.py", f"--predictions={predictions}",
         f"--workdir={workdir}", "--config.bootstrap_samples=200"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert sorted(p.name for p in workdir.iterdir()) == [
        "predicted_labels.csv", "reference_labels.csv", "results.json", "rexrank_predictions.json", "table.csv",
        "table.md"]
    results = json.loads((workdir / "results.json").read_text())
    assert results["labeler"] == "ours (CheXpert-style rules)"
    assert 0 < results["text_metrics"]["bleu_4"] < results["text_metrics"]["bleu_1"] < 1
    rexrank = json.loads((workdir / "rexrank_predictions.json").read_text())
    assert len(rexrank) == 60 and rexrank["s3"]["model_prediction"] == _report_records()[3]["generated"]
    assert rexrank["s3"]["findings"] == _report_records()[3]["reference"] == rexrank["s3"]["section_findings"]
    scored = [f["finding"] for f in results["result"]["findings"]]
    assert scored == ["Cardiomegaly", "Pneumothorax", "Pleural Effusion"]  # in CHEXPERT_OBSERVATIONS order
    assert results["result"]["bootstrap_samples"] == 200
    assert results["reference_label_counts"]["Cardiomegaly"] == {
        "positive": 30, "negative": 30, "uncertain": 0, "not_mentioned": 0}
    rows = {r["row"]: r for r in csv.DictReader(open(workdir / "table.csv"))}
    assert rows["Cardiomegaly"]["CXR-LLaVA f1"] == "0.86"
    assert rows["Edema"]["excluded_because"].startswith("fewer than 10")
    micro = results["result"]["averages"]["Average"]["micro"]
    assert float(rows["Average (micro)"]["f1"]) == pytest.approx(micro["f1"], abs=1e-4)
    markdown = (workdir / "table.md").read_text()
    assert "| Cardiomegaly | 0." in markdown and "Average (micro)" in markdown and "Excluded:" in markdown
    assert "labels by ours (CheXpert-style rules)" in markdown and "ROUGE-L" in markdown
    assert markdown in completed.stdout
    # The standard aggregates, from the same labels, in results.json and both tables.
    standard = results["standard"]["averages"]
    assert set(standard) == {"F1-14", "F1-5"} and 0 < standard["F1-5"]["micro"]["f1"] <= 1
    assert float(rows["F1-5 (micro)"]["f1"]) == pytest.approx(standard["F1-5"]["micro"]["f1"], abs=1e-4)
    assert rows["F1-14 (macro)"]["kind"] == "standard_macro" and "| F1-14 (micro) | " in markdown
    # An excluded finding names the setting that excludes it and how to change it.
    assert "setting min_class_count" in rows["Edema"]["excluded_because"]
    assert "--config.min_class_count=" in markdown


def test_report_jsonl_is_joined_to_references_by_image(tmp_path):
    """`cxrllava report --jsonl` lines (absolute image paths, one unreadable image) and a reference CSV that names
    the images under the data directory: scored without a converter, titled by the files scored."""
    records = _report_records(30)
    lines = [{"image": f"/data/mimic/files/p{i}/s{i}/view.jpg", "report": r["generated"]} for i, r in enumerate(records)]
    lines.append({"image": "/data/mimic/files/bad.jpg", "error": "cannot identify image file"})
    predictions = tmp_path / "r.jsonl"
    predictions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    references = tmp_path / "refs.csv"
    with open(references, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "report"])
        writer.writerows([f"files/p{i}/s{i}/view.jpg", r["reference"]] for i, r in enumerate(records))
    config = _small_config()
    config.update(min_class_count=1, min_class_fraction=0.0)
    results = run.evaluate_predictions(config, predictions, tmp_path / "work", references_csv=references, limit=20)
    assert results["result"]["n_reports"] == 20 and results["scored"] == "r.jsonl against refs.csv"
    expected = run.evaluate_records(config, records[:20], tmp_path / "direct")
    assert results["result"]["averages"] == expected["result"]["averages"]
    table = (tmp_path / "work" / "table.md").read_text()
    assert table.startswith("### F1 (95% CI) on r.jsonl against refs.csv") and "(paper)" not in table
    with pytest.raises(ValueError, match="give --references"):
        run.evaluate_predictions(config, predictions, tmp_path / "again")


@pytest.mark.parametrize("dataset, paper_shown", [("mimic", True), ("synthetic", False)])
def test_the_papers_column_only_for_the_papers_dataset(tmp_path, dataset, paper_shown):
    config = _small_config()
    config.dataset = dataset
    results = run.evaluate_records(config, _report_records(20), tmp_path)
    table = (tmp_path / "table.md").read_text()
    assert ("MIMIC internal test set" in results["title"]) == paper_shown == ("CXR-LLaVA (paper)" in table)
    assert f"on {dataset} / test" in results["title"]


def test_the_old_task_key_is_refused_naming_the_new_one(tmp_path):
    config = run.default_config()
    config.task = "json_labels"  # what configs said before the key was renamed
    with pytest.raises(ConfigError, match=r"config.task='json_labels': the key is now config.answer_kind"):
        run.evaluate_records(config, _report_records(2), tmp_path)
    assert not any(tmp_path.iterdir())


def test_json_labels_answers_count_unparsed_ones(tmp_path):
    config = run.default_config()
    config.answer_kind, config.paper_table, config.bootstrap_samples = "json_labels", "chexpert", 50
    records = [
        {"id": "a", "generated": '```json\n{"Cardiomegaly": "yes", "Edema": 0}\n```', "reference": {"Cardiomegaly": 1}},
        {"id": "b", "generated": "I cannot help with that.", "reference": {"Cardiomegaly": 0, "Edema": None}},
    ]
    results = run.evaluate_records(config, records, tmp_path)
    assert results["unparsed_predictions"] == {"count": 1, "ids": ["b"]}
    assert results["predicted_label_counts"]["Cardiomegaly"]["positive"] == 1


def test_label_files_from_another_labeler_are_matched_by_id(tmp_path):
    records = _report_records(40)
    run.evaluate_records(_small_config(), records, tmp_path / "first")
    reference, predicted = tmp_path / "first" / "reference_labels.csv", tmp_path / "first" / "predicted_labels.csv"
    rows = predicted.read_text().split("\n")
    predicted.write_text("\n".join([rows[0], *reversed([r for r in rows[1:] if r])]) + "\n")
    again = run.evaluate_label_files(_small_config(), reference, predicted, tmp_path / "second")
    first = json.loads((tmp_path / "first" / "results.json").read_text())
    assert json.loads(json.dumps(again["result"])) == first["result"]


def test_bad_records_are_named(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": 1, "generated": "x", "reference": "y"}\n{"id": 2, "generated": "x"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: record lacks \['reference'\]"):
        run.read_prediction_records(path)
    with pytest.raises(ValueError, match="unknown findings"):
        run.evaluate_records(_small_config(), [{"id": 1, "generated": "", "reference": {"Heart": 1}}], tmp_path)


def _small_config():
    config = run.default_config()
    config.bootstrap_samples = 50
    return config
