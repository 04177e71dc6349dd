"""MIMIC-CXR-JPG as published: metadata, CheXpert labels and split CSVs (optionally .gz), JPGs under
files/pXX/pSUBJECT/sSTUDY/, and the MIMIC-CXR reports (files/pXX/pSUBJECT/sSTUDY.txt, here under
`reports/`). Frontal (PA/AP) images only; the report keeps its FINDINGS and IMPRESSION sections.
The split names are MIMIC's own: train, validate, test.
The synthetic dataset is written in this layout, so this adapter reads it too (plus its instruction
turns when `synthetic-instructions.jsonl` is present).
"""

import re
from pathlib import Path

from cxrllava_jax import files
from input_pipeline import tables
from input_pipeline.records import FRONTAL_VIEWS, Record, labels_from, sectioned_report

SECTION = re.compile(r"^\s*(FINDINGS|IMPRESSION)\s*:\s*", re.MULTILINE)
ANY_SECTION = re.compile(r"^\s*[A-Z][A-Z /]+:\s*", re.MULTILINE)


def report_sections(text: str) -> str:
    """FINDINGS and IMPRESSION sections of a MIMIC report, whitespace collapsed; the whole text if neither."""
    sections = []
    for match in SECTION.finditer(text):
        rest = text[match.end():]
        following = ANY_SECTION.search(rest)
        sections.append((match.group(1), rest[:following.start()] if following else rest))
    return sectioned_report(sections) if sections else " ".join(text.split())


def load(root, split: str | None = None) -> list[Record]:
    root = Path(root)

    def table(name, columns):
        return tables.rows(tables.require(root, name, dataset="MIMIC-CXR-JPG"), columns)

    splits = {r["dicom_id"]: r["split"] for _, r in table("mimic-cxr-2.0.0-split.csv", ("dicom_id", "split"))}
    labels = {(r["subject_id"], r["study_id"]): (origin, r)
              for origin, r in table("mimic-cxr-2.0.0-chexpert.csv", ("subject_id", "study_id"))}
    instructions = {}
    if (root / "synthetic-instructions.jsonl").is_file():
        instructions = {str(r["study_id"]): r["conversations"]
                        for _, r in files.read_json_lines(root / "synthetic-instructions.jsonl")}
    records = []
    for origin, row in table("mimic-cxr-2.0.0-metadata.csv", ("dicom_id", "subject_id", "study_id", "ViewPosition")):
        if row["ViewPosition"] not in FRONTAL_VIEWS:
            continue
        record_split = splits.get(row["dicom_id"], "")
        if split and record_split != split:
            continue
        subject, study = row["subject_id"], row["study_id"]
        relative = Path("files") / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        report_file = root / "reports" / relative.parent / f"s{study}.txt"
        report = report_sections(files.read_text(report_file)) if report_file.is_file() else ""
        label_origin, label_row = labels.get((subject, study), (origin, {}))
        records.append(Record(
            image=str(root / relative / f"{row['dicom_id']}.jpg"),
            labels=labels_from(label_row, label_origin),
            report=report, dataset="mimic", split=record_split, view=row["ViewPosition"], study_id=study,
            conversations=instructions.get(study), origin=origin,
        ))
    return records
