"""The RSNA COVID-19 AI Detection Challenge (2021), i.e. the SIIM-FISABIO-RSNA COVID-19 Detection data the paper
lists in Table 1 (its reference 24: 6,334 training images; the paper's 5,066 + 634 are about 80% + 10% of them).
Published on Kaggle as:

- train_study_level.csv: id ('STUDY_study'), Negative for Pneumonia, Typical Appearance, Indeterminate
  Appearance, Atypical Appearance (one-hot);
- train_image_level.csv: id ('IMAGE_image'), boxes, label ('opacity CONF x0 y0 x1 y1 ...' or
  'none 1 0 0 1 1'), StudyInstanceUID;
- DICOMs at train/STUDY/SERIES/IMAGE.dcm (the series is known only from the folder).

In the CheXpert observations (our rule): Typical -> Pneumonia 1; Indeterminate or Atypical -> Pneumonia -1
(opacities whose cause the readers could not call); Negative -> Pneumonia 0. An image with opacity boxes ->
Lung Opacity 1, 'none' -> 0. Nothing else is graded. Splits: train:validate by study (`hashed_split`); the
challenge's test labels were never published. Views are not in the tables (view 'frontal').
For the older RSNA Pneumonia Detection Challenge (2018) see `rsna_pneumonia`.
"""

import os
from pathlib import Path

from input_pipeline import tables
from cxrllava_jax.errors import InputError
from input_pipeline.records import FRONTAL, Record, hashed_split, mapped_labels

STUDY_CLASSES = {
    "Negative for Pneumonia": 0.0,
    "Typical Appearance": 1.0,
    "Indeterminate Appearance": -1.0,
    "Atypical Appearance": -1.0,
}
GRADED = ("Lung Opacity", "Pneumonia")


def load(root, split: str | None = None) -> list[Record]:
    root = Path(root)
    study_file = tables.require(root, "train_study_level.csv", dataset="SIIM-FISABIO-RSNA COVID-19")
    image_file = tables.require(root, "train_image_level.csv", dataset="SIIM-FISABIO-RSNA COVID-19")
    pneumonia = {_strip(row["id"], "_study"): _study_class(row, origin)
                 for origin, row in tables.rows(study_file, ("id", *STUDY_CLASSES))}
    dicoms = _dicom_index(root / "train")
    records = []
    for origin, row in tables.rows(image_file, ("id", "label", "StudyInstanceUID")):
        image_id, study = _strip(row["id"], "_image"), row["StudyInstanceUID"]
        if study not in pneumonia:
            raise InputError(f"{origin}: study {study} has no row in {study_file.name}")
        record_split = hashed_split(f"rsna_covid/{study}")
        if split and record_split != split:
            continue
        found = [("Lung Opacity", 1.0)] if _has_opacity(row["label"], origin) else []
        if pneumonia[study]:
            found.append(("Pneumonia", pneumonia[study]))
        # Without the images the series folder is unknown: the path then skips it.
        image = dicoms.get(image_id) or os.path.join(root, "train", study, f"{image_id}.dcm")
        records.append(Record(image=image, labels=mapped_labels(found, GRADED, normal=None), report="",
                              dataset="rsna_covid", split=record_split, view=FRONTAL, study_id=study,
                              origin=origin))
    return records


def _study_class(row: dict, origin: str) -> float:
    chosen = [name for name in STUDY_CLASSES if row[name].strip() not in ("0", "0.0", "")]
    if len(chosen) != 1 or row[chosen[0]].strip() not in ("1", "1.0"):
        raise InputError(f"{origin}: expected exactly one of {list(STUDY_CLASSES)} to be 1, got "
                         f"{[row[name] for name in STUDY_CLASSES]}")
    return STUDY_CLASSES[chosen[0]]


def _has_opacity(label: str, origin: str) -> bool:
    kinds = set(label.split()[::6])
    if not kinds or not kinds <= {"opacity", "none"} or len(label.split()) % 6:
        raise InputError(f"{origin}: label {label!r} is not 'opacity CONF x0 y0 x1 y1 ...' or 'none 1 0 0 1 1'")
    return "opacity" in kinds


def _strip(identifier: str, suffix: str) -> str:
    return identifier[:-len(suffix)] if identifier.endswith(suffix) else identifier


def _dicom_index(train: Path) -> dict[str, str]:
    """image id -> its DICOM path, from train/STUDY/SERIES/IMAGE.dcm."""
    if not train.is_dir():
        return {}
    return {p.stem: str(p) for p in train.glob("*/*/*.dcm")}
