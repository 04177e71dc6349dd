"""MIMIC-CXR-JPG as published: metadata, CheXpert labels and split CSVs (optionally .gz), JPGs under
files/pXX/pSUBJECT/sSTUDY/, and the MIMIC-CXR reports (files/pXX/pSUBJECT/sSTUDY.txt, here under
`reports/`). Frontal (PA/AP) images only; the report keeps its FINDINGS and IMPRESSION sections.
The synthetic dataset is written in this layout, so this adapter reads it too (plus its instruction
turns when `synthetic-instructions.jsonl` is present).
"""

import csv
import gzip
import json
import re
from pathlib import Path

from input_pipeline.records import FRONTAL_VIEWS, Record, labels_from

SECTION = re.compile(r"^\s*(FINDINGS|IMPRESSION)\s*:\s*", re.MULTILINE)
ANY_SECTION = re.compile(r"^\s*[A-Z][A-Z /]+:\s*", re.MULTILINE)


def _rows(root: Path, name: str) -> list[dict]:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            opener = gzip.open if candidate.suffix == ".gz" else open
            with opener(candidate, "rt", newline="") as f:
                return list(csv.DictReader(f))
    raise FileNotFoundError(f"{root}: {name}(.gz) not found (is this a MIMIC-CXR-JPG directory?)")


def report_sections(text: str) -> str:
    """FINDINGS and IMPRESSION sections of a MIMIC report, whitespace collapsed; the whole text if neither."""
    kept = []
    for match in SECTION.finditer(text):
        rest = text[match.end():]
        following = ANY_SECTION.search(rest)
        body = rest[:following.start()] if following else rest
        kept.append(f"{match.group(1)}: {' '.join(body.split())}")
    return "\n\n".join(kept) if kept else " ".join(text.split())


def load(root, split: str | None = None) -> list[Record]:
    root = Path(root)
    splits = {r["dicom_id"]: r["split"] for r in _rows(root, "mimic-cxr-2.0.0-split.csv")}
    labels = {(r["subject_id"], r["study_id"]): r for r in _rows(root, "mimic-cxr-2.0.0-chexpert.csv")}
    instructions = {}
    if (root / "synthetic-instructions.jsonl").is_file():
        with open(root / "synthetic-instructions.jsonl") as f:
            instructions = {str(r["study_id"]): r["conversations"] for r in map(json.loads, f)}
    records = []
    for row in _rows(root, "mimic-cxr-2.0.0-metadata.csv"):
        if row["ViewPosition"] not in FRONTAL_VIEWS:
            continue
        record_split = splits.get(row["dicom_id"], "")
        if split and record_split != split:
            continue
        subject, study = row["subject_id"], row["study_id"]
        relative = Path("files") / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        report_file = root / "reports" / relative.parent / f"s{study}.txt"
        report = report_sections(report_file.read_text()) if report_file.is_file() else ""
        origin = f"mimic-cxr-2.0.0-chexpert.csv (subject {subject}, study {study})"
        records.append(Record(
            image=str(root / relative / f"{row['dicom_id']}.jpg"),
            labels=labels_from(labels.get((subject, study), {}), origin),
            report=report, dataset="mimic", split=record_split, view=row["ViewPosition"], study_id=study,
            conversations=instructions.get(study),
        ))
    return records
