"""The text metrics report-generation papers compare beside label F1, and the per-study file ReXrank scores.

BLEU-1..4: corpus BLEU from sacrebleu with the maximum n-gram order set to n (cumulative, uniform weights), on
lower-cased text with sacrebleu's default 13a tokenizer; its signature is returned so the figure can be
reproduced. ROUGE-L: the mean over studies of rouge-score's ROUGE-L F-measure.
"""

import json
import re

import sacrebleu
from rouge_score import rouge_scorer

from cxrllava_jax import files

_SECTION = re.compile(r"^(FINDINGS|IMPRESSION):\s*", re.MULTILINE)


def text_scores(references, generated) -> dict:
    """{"bleu_1" .. "bleu_4", "rouge_l"} in [0, 1], and "bleu_signature"."""
    references, generated = list(references), list(generated)
    scores = {}
    for n in range(1, 5):
        bleu = sacrebleu.metrics.BLEU(max_ngram_order=n, lowercase=True)
        scores[f"bleu_{n}"] = bleu.corpus_score(generated, [references]).score / 100
        signature = str(bleu.get_signature())
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [scorer.score(r, g)["rougeL"].fmeasure for r, g in zip(references, generated)]
    scores["rouge_l"] = sum(rouge) / max(len(rouge), 1)
    scores["bleu_signature"] = signature
    return scores


def report_sections(report: str) -> dict:
    """'FINDINGS: ...\n\nIMPRESSION: ...' (the adapters' report text) -> {"findings", "impression"}; a report
    without section names is all findings."""
    parts = _SECTION.split(report)
    if len(parts) == 1:
        return {"findings": report.strip(), "impression": ""}
    sections = dict(zip(parts[1::2], (p.strip() for p in parts[2::2])))
    return {"findings": sections.get("FINDINGS", ""), "impression": sections.get("IMPRESSION", "")}


def write_rexrank_json(path, records, split) -> None:
    """ReXrank's prediction file: {study id: {"model_prediction", "findings", "impression", "section_findings",
    "section_impression", "split"}}, the layout of its example prediction.json and what its evaluation script reads."""
    studies = {}
    for record in records:
        reference = report_sections(record["reference"])
        studies[str(record["id"])] = {
            "model_prediction": record["generated"],
            **reference,
            "section_findings": reference["findings"],
            "section_impression": reference["impression"],
            "split": split,
        }
    files.write_text_atomically(path, json.dumps(studies, indent=2))
