"""Change statements: the synthetic study set's reports say each finding's change, the scorer reads them back,
and eval's results carry the accuracy."""

import pytest

from cxrllava_jax.evaluation import changes, run
from input_pipeline import conversations, synthetic
from tests.test_eval_run import _small_config

# The synthetic finding kinds as the scorer names findings, and its changes as the scorer's.
FINDING = {"effusion": "pleural effusion", "cardiomegaly": "cardiomegaly", "pneumothorax": "pneumothorax",
           "consolidation": "consolidation", "edema": "edema", "atelectasis": "atelectasis", "nodule": "nodule or mass"}
CHANGE = {"new": "new", "resolved": "resolved", "increased": "worse", "decreased": "better", "unchanged": "unchanged"}


@pytest.fixture(scope="module")
def study_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("studies")
    return out, synthetic.write_studies(out, 40, image_size=32, seed=5)


def test_every_synthetic_change_is_stated_and_read_back(study_set):
    _, pairs = study_set
    assert {c for p in pairs for c in p.changes.values()} == set(synthetic.CHANGES)
    for pair in pairs:
        assert changes.change_statements(pair.report) == {FINDING[n]: CHANGE[c] for n, c in pair.changes.items()}
        for name, change in pair.changes.items():
            in_prior, in_current = (any(f.name == name for f in fs) for fs in (pair.prior, pair.current))
            assert (in_prior, in_current) == {"new": (False, True), "resolved": (True, False)}.get(change, (True, True))


def test_the_study_set_is_read_as_conversations_with_three_images_and_a_single_image_baseline(study_set):
    out, pairs = study_set
    studies, single = conversations.load(out / "studies-train.jsonl"), conversations.load(out / "single-train.jsonl")
    assert len(studies) == len(single) == sum(p.split == "train" for p in pairs)
    assert [len(r.image) for r in studies] == [3] * len(studies) and all(isinstance(r.image, str) for r in single)
    assert [r.image[0] for r in studies] == [r.image for r in single]  # the baseline sees the current frontal film
    first = studies[0].conversations[0][0]["content"]
    assert "Prior report: FINDINGS:" in first and first.count("<image>") == 3


def test_same_seed_same_study_bytes(tmp_path):
    for name in ("a", "b"):
        synthetic.write_studies(tmp_path / name, 4, image_size=32, seed=9)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


def test_scores_count_a_statement_right_only_when_the_same_change_is_said():
    references = ["New small left pleural effusion. Unchanged cardiomegaly. No new consolidation.",
                  "The right pneumothorax has resolved."]
    generated = ["Small left effusion, unchanged. The heart size is stable.", "Small right pneumothorax is new."]
    assert changes.change_statements(references[0]) == {"pleural effusion": "new", "cardiomegaly": "unchanged"}
    scores = changes.change_scores(references, generated)
    assert (scores["statements"], scores["accuracy"], scores["changed"], scores["changed_accuracy"]) == (3, 1 / 3, 2, 0)
    assert scores["per_change"]["resolved"] == {"count": 1, "accuracy": 0.0}
    assert changes.change_scores(["No pneumothorax."], ["No pneumothorax."])["accuracy"] is None


def test_eval_results_carry_change_accuracy_for_comparison_reports(tmp_path):
    records = [{"id": f"s{i}", "reference": "New small left pleural effusion. No pneumothorax.",
                "generated": ("New" if i % 2 else "Unchanged") + " small left pleural effusion. No pneumothorax."}
               for i in range(20)]
    results = run.evaluate_records(_small_config(), records, tmp_path)
    assert results["change_statements"]["changed_accuracy"] == 0.5
