"""The labeler's development set: NegBio's hand-made labels of 3,851 OpenI (Indiana) reports.

The gold file (`openi_gld_std14.csv`, public domain, Peng et al. 2018) marks ChestX-ray14 findings as present;
the texts are the FINDINGS and IMPRESSION sections of the NLMCXR report XMLs. Findings are mapped to the CheXpert
observations they correspond to (below), and a labeler is scored on positive mentions: an observation counts
as found when the labeler says 1 (uncertain and negative are "not found"), as the gold marks only findings that
are present.
"""

import csv
import dataclasses
from pathlib import Path

import numpy as np

from cxrllava_jax.domain.findings import CHEXPERT_OBSERVATIONS, POSITIVE
from input_pipeline import indiana

# CheXpert observation -> the ChestX-ray14 columns of the gold file that mean it ("normal" is MeSH normal).
GOLD_COLUMNS = {
    "No Finding": ("normal",),
    "Cardiomegaly": ("Cardiomegaly",),
    "Lung Lesion": ("Mass", "Nodule"),
    "Edema": ("Edema",),
    "Consolidation": ("Consolidation",),
    "Pneumonia": ("Pneumonia",),
    "Atelectasis": ("Atelectasis",),
    "Pneumothorax": ("Pneumothorax",),
    "Pleural Effusion": ("Effusion",),
}
SCORED_OBSERVATIONS = tuple(o for o in CHEXPERT_OBSERVATIONS if o in GOLD_COLUMNS)


@dataclasses.dataclass
class DevSet:
    """Report texts and gold positives: `gold` is (n, len(SCORED_OBSERVATIONS)) bool."""

    ids: list
    reports: list
    gold: np.ndarray


def load(gold_csv, openi_root) -> DevSet:
    """The gold rows whose report is in the Open-i archive (NLMCXR_reports.tgz or ecgen-radiology/) at `openi_root`."""
    texts = {study: "\n\n".join(text.strip() for _, text in sections if text.strip())
             for _, study, sections, _ in indiana.openi_reports(Path(openi_root))}
    with open(gold_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    missing = [r["filename"] for r in rows if r["filename"] not in texts]
    if missing:
        raise ValueError(f"{gold_csv}: no report in {openi_root} for {missing[:5]} ({len(missing)} in all)")
    gold = [[any(r[c] == "1" for c in GOLD_COLUMNS[o]) for o in SCORED_OBSERVATIONS] for r in rows]
    return DevSet([r["filename"] for r in rows], [texts[r["filename"]] for r in rows], np.array(gold, dtype=bool))


def score_positive(labels, gold) -> dict:
    """Positive-mention agreement of (n, 14) labels with the gold: per observation and micro-averaged
    {"precision", "recall", "f1", "gold"} (gold = number of gold positives)."""
    columns = [CHEXPERT_OBSERVATIONS.index(o) for o in SCORED_OBSERVATIONS]
    found = np.asarray(labels)[:, columns] == POSITIVE
    scores = {o: _prf(found[:, j], gold[:, j]) for j, o in enumerate(SCORED_OBSERVATIONS)}
    scores["micro"] = _prf(found.ravel(), gold.ravel())
    return scores


def _prf(found, gold):
    tp, fp, fn = int((found & gold).sum()), int((found & ~gold).sum()), int((~found & gold).sum())
    return {"precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1), "f1": 2 * tp / max(2 * tp + fp + fn, 1),
            "gold": int(gold.sum())}
