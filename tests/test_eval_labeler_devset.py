"""The report labeler on real reports: NegBio's hand-made labels of 3,851 Open-i reports (the development set).

The floor is what the labeler reaches on mapped positive findings; the figures per observation are printed here
and written by benchmarks/bench_evaluation.py.
"""

from pathlib import Path

import numpy as np
import pytest

from cxrllava_jax.domain.labeler import label_reports
from cxrllava_jax.evaluation import labeler_devset
from cxrllava_jax.reference.wheels import torchxrayvision_data

GOLD = Path(__file__).parent / "fixtures" / "openi-negbio-gold" / "openi_gld_std14.csv"


@pytest.fixture(scope="module")
def devset(tmp_path_factory):
    root = tmp_path_factory.mktemp("openi")
    (root / "NLMCXR_reports.tgz").write_bytes(torchxrayvision_data()("NLMCXR_reports.tgz"))
    return labeler_devset.load(GOLD, root)


def test_devset_is_the_whole_gold_file(devset):
    assert len(devset.reports) == 3851 and len(set(devset.ids)) == 3851
    assert sum(map(bool, devset.reports)) > 3800  # a few reports have neither FINDINGS nor IMPRESSION
    counts = dict(zip(labeler_devset.SCORED_OBSERVATIONS, devset.gold.sum(0)))
    assert counts["No Finding"] > 1000 and counts["Pneumothorax"] > 10


def test_positive_agreement_with_the_gold_labels(devset):
    scores = labeler_devset.score_positive(label_reports(devset.reports), devset.gold)
    for observation, s in scores.items():
        print(f"{observation:18s} gold {s['gold']:5d}  precision {s['precision']:.3f}  recall {s['recall']:.3f}  "
              f"F1 {s['f1']:.3f}")
    assert scores["micro"]["f1"] >= 0.90
    assert min(s["f1"] for s in scores.values()) >= 0.70


def test_scores_count_only_positive_labels():
    labels = np.full((3, 14), np.nan)
    column = labeler_devset.SCORED_OBSERVATIONS.index("Cardiomegaly")
    labels[:, 2] = [1.0, -1.0, 1.0]  # Cardiomegaly: found, uncertain (not found), found
    gold = np.zeros((3, len(labeler_devset.SCORED_OBSERVATIONS)), dtype=bool)
    gold[:2, column] = True
    scores = labeler_devset.score_positive(labels, gold)
    assert scores["Cardiomegaly"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "gold": 2}
    assert scores["Edema"]["f1"] == 0.0 and scores["micro"]["gold"] == 2
