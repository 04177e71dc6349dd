"""The RSNA Pneumonia Detection Challenge (2018, Kaggle) as published: stage_2_train_labels.csv (patientId, x, y,
width, height, Target; one row per box, one row with empty box for Target 0), the optional
stage_2_detailed_class_info.csv (patientId, class: 'Lung Opacity', 'No Lung Opacity / Not Normal', 'Normal'),
and DICOMs at stage_2_train_images/PATIENTID.dcm (one frontal image per patientId).

In the CheXpert observations (our rule): Target 1 (opacity suspicious for pneumonia) -> Lung Opacity 1 and
Pneumonia 1; Target 0 -> both 0. With the class file, 'Normal' -> No Finding 1, the other classes -> 0.
Splits: train:validate by patientId (`hashed_split`). The paper's "RSNA COVID-19" is `rsna_covid`; this older
set is kept because its labels are public (the torchxrayvision wheel carries them) and it is often added.
"""

import os
from pathlib import Path

from input_pipeline import tables
from cxrllava_jax.errors import InputError
from input_pipeline.records import FRONTAL, Record, hashed_split, mapped_labels

GRADED = ("Lung Opacity", "Pneumonia")
CLASSES = {"Lung Opacity": False, "No Lung Opacity / Not Normal": False, "Normal": True}


def load(root, split: str | None = None) -> list[Record]:
    root = Path(root)
    labels_file = tables.require(root, "stage_2_train_labels.csv", "stage_1_train_labels.csv",
                                 dataset="RSNA Pneumonia Detection")
    normal = _normal_by_class(root)
    targets: dict[str, tuple[str, str]] = {}
    for origin, row in tables.rows(labels_file, ("patientId", "Target")):
        patient, target = row["patientId"], row["Target"].strip()
        if target not in ("0", "1"):
            raise InputError(f"{origin}: Target is {target!r}; expected 0 or 1")
        if targets.setdefault(patient, (origin, target))[1] != target:
            raise InputError(f"{origin}: Target {target} contradicts {targets[patient][0]} for patient {patient}")
    records = []
    for patient, (origin, target) in targets.items():
        record_split = hashed_split(f"rsna_pneumonia/{patient}")
        if split and record_split != split:
            continue
        found = [(o, 1.0) for o in GRADED] if target == "1" else []
        records.append(Record(
            image=os.path.join(root, "stage_2_train_images", f"{patient}.dcm"),
            labels=mapped_labels(found, GRADED, normal=normal.get(patient)), report="", dataset="rsna_pneumonia",
            split=record_split, view=FRONTAL, study_id=patient, origin=origin))
    return records


def _normal_by_class(root: Path) -> dict[str, bool]:
    path = tables.find(root, "stage_2_detailed_class_info.csv", "stage_1_detailed_class_info.csv")
    if path is None:
        return {}
    normal = {}
    for origin, row in tables.rows(path, ("patientId", "class")):
        if row["class"] not in CLASSES:
            raise InputError(f"{origin}: class {row['class']!r} is not one of {list(CLASSES)}")
        normal[row["patientId"]] = CLASSES[row["class"]]
    return normal
