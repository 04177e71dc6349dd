"""BrixIA COVID-19 as published: metadata_global_v2.csv (';'-separated; Filename, Subject, BrixiaScore,
BrixiaScoreGlobal, ConsensusTestset, ... see brixia.github.io) and the DICOMs in dicom_clean/Filename.

Every image is of a COVID-19 patient, scored 0-3 in six lung zones (A-F): 0 no abnormality, 1 interstitial
infiltrates, 2-3 interstitial and alveolar infiltrates. In the CheXpert observations (our rule): a positive
zone makes Lung Opacity and Pneumonia positive, all zones 0 make both negative; nothing else is graded (the
score says nothing about the heart, pleura or devices). BrixiaScore loses its leading zeros when a spreadsheet
has stored it as a number, so it is left-padded to six digits; BrixiaScoreGlobal must be their sum.

Splits: ConsensusTestset = 1 (the 150-image consensus set) -> 'test', the rest train:validate by subject
(`hashed_split`). Images are AP or PA (view 'frontal' unless a ViewPosition column says which).
"""

from pathlib import Path

from input_pipeline import tables
from cxrllava_jax.errors import InputError
from input_pipeline.records import FRONTAL, FRONTAL_VIEWS, Record, hashed_split, mapped_labels

METADATA_FILES = ("metadata_global_v2.csv", "metadata_global_v1.csv")
COLUMNS = ("Filename", "Subject", "BrixiaScore", "BrixiaScoreGlobal", "ConsensusTestset")
GRADED = ("Lung Opacity", "Pneumonia")


def load(root, split: str | None = None) -> list[Record]:
    root = Path(root)
    path = tables.require(root, *METADATA_FILES, dataset="BrixIA")
    records = []
    for origin, row in tables.rows(path, COLUMNS, delimiter=";"):
        zones = _zones(row["BrixiaScore"], row["BrixiaScoreGlobal"], origin)
        if row["ConsensusTestset"].strip() not in ("0", "1"):
            raise InputError(f"{origin}: ConsensusTestset is {row['ConsensusTestset']!r}; expected 0 or 1")
        record_split = "test" if row["ConsensusTestset"].strip() == "1" else hashed_split(f"brixia/{row['Subject']}")
        if split and record_split != split:
            continue
        view = row.get("ViewPosition", "")
        records.append(Record(
            image=str(root / "dicom_clean" / row["Filename"]),
            labels=mapped_labels([(o, 1.0) for o in GRADED] if any(zones) else [], GRADED, normal=None),
            report="", dataset="brixia", split=record_split, view=view if view in FRONTAL_VIEWS else FRONTAL,
            study_id=row.get("StudyId", ""), origin=origin))
    return records


def _zones(score: str, total: str, origin: str) -> list[int]:
    digits = score.strip().split(".")[0].zfill(6)
    if len(digits) != 6 or any(d not in "0123" for d in digits):
        raise InputError(f"{origin}: BrixiaScore {score!r} is not six zone scores 0-3")
    zones = [int(d) for d in digits]
    try:
        declared = float(total) if total.strip() else sum(zones)
    except ValueError:
        declared = None
    if declared != sum(zones):
        raise InputError(f"{origin}: BrixiaScoreGlobal {total!r} is not the sum of BrixiaScore {score!r}")
    return zones
