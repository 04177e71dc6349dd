"""Reader study: a blinded, deterministic export and the analysis of returned ratings (paper, Table 5)."""

import csv
import json

import pytest
from scipy import stats

from cxrllava_jax.cli import main as cxrllava
from cxrllava_jax.evaluation.reader_study import analyze_ratings, cochrans_q


def _export(tmp_path, seed, name):
    predictions = tmp_path / "cases.jsonl"
    predictions.write_text("\n".join(json.dumps(
        {"id": f"case{i}", "image": f"img/{i}.png", "generated": f"model report {i}", "reference": f"true report {i}"}
    ) for i in range(10)))
    sheet, key = tmp_path / f"{name}_sheet.csv", tmp_path / f"{name}_key.csv"
    assert cxrllava(["reader-study", "export", "--predictions", str(predictions), "--sheet", str(sheet),
                     "--key", str(key), "--seed", str(seed)]) == 0
    return sheet, key


def _rows(path):
    return list(csv.DictReader(open(path, newline="")))


def test_export_is_blinded_shuffled_and_deterministic(tmp_path):
    sheet, key = _export(tmp_path, seed=3, name="a")
    again, _ = _export(tmp_path, seed=3, name="b")
    other, _ = _export(tmp_path, seed=4, name="c")
    assert sheet.read_text() == again.read_text()
    assert sheet.read_text() != other.read_text()
    rows = _rows(sheet)
    assert list(rows[0]) == ["item", "image", "report", "rating", "comment"]  # no source, no case id
    assert len(rows) == 20 and all(r["rating"] == "" for r in rows)
    sources = [k["source"] for k in _rows(key)]
    assert sorted(sources) == ["ground_truth"] * 10 + ["model"] * 10
    assert sources[:10] != ["model", "ground_truth"] * 5  # not in pair order
    by_item = {k["item"]: k for k in _rows(key)}
    for row in rows:  # the key maps every item back to its case and the report shown
        case = by_item[row["item"]]["case"][4:]
        assert row["image"] == f"img/{case}.png"
        assert row["report"] == ("model" if by_item[row["item"]]["source"] == "model" else "true") + f" report {case}"


def test_cochrans_q_on_a_hand_computed_case():
    # C = (5, 3, 2), N = 10, sum R^2 = 22, k = 3: Q = 2 (3 * 38 - 100) / (30 - 22) = 3.5; p = exp(-3.5 / 2).
    outcomes = [[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0], [1, 0, 1], [1, 1, 0]]
    q, p = cochrans_q(outcomes)
    assert q == pytest.approx(3.5)
    assert p == pytest.approx(0.1737739435, rel=1e-8)
    # With two sources Q is McNemar's statistic (b - c)^2 / (b + c): here b = 6, c = 1.
    q2, p2 = cochrans_q([[1, 0]] * 6 + [[0, 1]] + [[1, 1]] * 5 + [[0, 0]] * 3)
    assert q2 == pytest.approx(25 / 7) and p2 == pytest.approx(stats.chi2.sf(25 / 7, 1))
    assert cochrans_q([[1, 1], [0, 0]]) == (0.0, 1.0)


def test_analysis_of_returned_ratings(tmp_path):
    sheet, key = _export(tmp_path, seed=0, name="s")
    source = {k["item"]: k["source"] for k in _rows(key)}
    ratings = []
    for reader, model_grade in (("reader1", "B"), ("reader2", "D")):
        path = tmp_path / f"{reader}.csv"
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["item", "image", "report", "rating", "comment"])
            writer.writeheader()
            for row in _rows(sheet):
                writer.writerow({**row, "rating": "a" if source[row["item"]] == "ground_truth" else model_grade})
        ratings.append(str(path))
    out = tmp_path / "analysis.json"
    assert cxrllava(["reader-study", "analyze", "--key", str(key), "--ratings", *ratings, "--out", str(out)]) == 0
    analysis = json.loads(out.read_text())
    model, truth = analysis["per_source"]["model"], analysis["per_source"]["ground_truth"]
    assert model["classes"] == {"A": 0, "B": 10, "C": 0, "D": 10} and model["success_rate"] == 0.5
    assert truth["classes"]["A"] == 20 and truth["success_rate"] == 1.0
    # 20 blocks (2 readers x 10 cases); discordant only where reader2 gave the model D: Q = 10^2 / 10 = 10.
    assert analysis["cochran_q"]["blocks"] == 20
    assert analysis["cochran_q"]["statistic"] == pytest.approx(10.0)

    bad = tmp_path / "bad.csv"
    bad.write_text("item,rating\nitem-01,E\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: item 'item-01' rating 'E'"):
        analyze_ratings(key, [bad])
