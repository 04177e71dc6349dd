"""BLEU-1..4 and ROUGE-L against sacrebleu and rouge-score called directly, and ReXrank's prediction file."""

import json

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from cxrllava_jax.evaluation import text_metrics

REFERENCES = [
    "FINDINGS: The heart is normal in size. The lungs are clear.\n\nIMPRESSION: No acute cardiopulmonary process.",
    "Small left pleural effusion with adjacent atelectasis. No pneumothorax.",
    "Moderate cardiomegaly. Mild pulmonary edema.",
]
GENERATED = [
    "The heart size is normal. Lungs are clear. No acute cardiopulmonary process.",
    "Small left effusion and atelectasis. No pneumothorax is seen.",
    "Heart is enlarged. No edema.",
]


def test_bleu_is_sacrebleu_corpus_bleu_of_each_order():
    scores = text_metrics.text_scores(REFERENCES, GENERATED)
    full = sacrebleu.corpus_bleu(GENERATED, [REFERENCES], lowercase=True)
    assert scores["bleu_4"] == pytest.approx(full.score / 100)
    # BLEU-1 is the brevity penalty times the clipped unigram precision of the same corpus statistics.
    assert scores["bleu_1"] == pytest.approx(full.bp * full.precisions[0] / 100)
    assert scores["bleu_1"] > scores["bleu_2"] > scores["bleu_3"] > scores["bleu_4"] > 0
    assert "nrefs:1" in scores["bleu_signature"] and "case:lc" in scores["bleu_signature"]


def test_rouge_l_is_the_mean_of_rouge_score_per_pair():
    scores = text_metrics.text_scores(REFERENCES, GENERATED)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    expected = [scorer.score(r, g)["rougeL"].fmeasure for r, g in zip(REFERENCES, GENERATED)]
    assert scores["rouge_l"] == pytest.approx(sum(expected) / 3)
    # By hand for the last pair: the longest common subsequence is "edema", 1 token of 5 on each side.
    assert expected[2] == pytest.approx(2 * (1 / 5) * (1 / 5) / (1 / 5 + 1 / 5))


def test_identical_texts_score_one():
    scores = text_metrics.text_scores(REFERENCES, REFERENCES)
    assert all(scores[k] == pytest.approx(1.0) for k in ("bleu_1", "bleu_4", "rouge_l"))


def test_rexrank_file_splits_the_reference_into_sections(tmp_path):
    records = [{"id": 7, "generated": GENERATED[0], "reference": REFERENCES[0]},
               {"id": "s2", "generated": GENERATED[1], "reference": REFERENCES[1]}]
    text_metrics.write_rexrank_json(tmp_path / "p.json", records, "test")
    studies = json.loads((tmp_path / "p.json").read_text())
    assert studies["7"] == {
        "model_prediction": GENERATED[0],
        "findings": "The heart is normal in size. The lungs are clear.",
        "impression": "No acute cardiopulmonary process.",
        "section_findings": "The heart is normal in size. The lungs are clear.",
        "section_impression": "No acute cardiopulmonary process.",
        "split": "test",
    }
    assert studies["s2"]["findings"] == REFERENCES[1] and studies["s2"]["impression"] == ""
