"""VinDr-CXR in either published layout:

- PhysioNet (vindr-cxr 1.0.0): annotations/image_labels_train.csv (image_id, rad_id, then one 0/1 column per
  finding, three radiologists per image) and annotations/image_labels_test.csv (the 5-radiologist consensus, no
  rad_id); DICOMs at train/ID.dicom and test/ID.dicom;
- Kaggle (vinbigdata-chest-xray-abnormalities-detection): train.csv with one row per reader and box
  (image_id, class_name, class_id, rad_id, x_min, y_min, x_max, y_max; 'No finding' rows have no box); DICOMs
  at train/ID.dicom.
The boxes (annotations_train.csv, the x/y columns) are not read: the paper did not use lesion locations.

Readers are aggregated per finding (our rule): positive (1) when more than half of the image's readers marked
it, uncertain (-1) when some but not most did; No Finding is 1 when most readers marked 'No finding', else 0.
A consensus row counts as one reader. Splits: train:validate by image (`hashed_split`; VinDr publishes no
patient ids), the PhysioNet test set -> 'test'. All images are frontal (view 'frontal').

VinDr findings in the CheXpert observations (our choice; phrases as our report labeler reads them) are
`VINDR_TO_CHEXPERT`; the others (e.g. Aortic enlargement, Emphysema) make No Finding 0 without a positive
observation. Graded are the observations some finding of the file maps to (Kaggle has no Fracture, Edema or
Pneumonia class, so those stay NaN there); Support Devices is never graded.
"""

import collections
import os
from pathlib import Path

from input_pipeline import tables
from cxrllava_jax.errors import InputError
from input_pipeline.records import FRONTAL, Record, hashed_split, mapped_labels

VINDR_TO_CHEXPERT = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Clavicle fracture": "Fracture",
    "Rib fracture": "Fracture",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
    "ILD": "Lung Opacity",
    "Infiltration": "Lung Opacity",
    "Lung Opacity": "Lung Opacity",
    "Pulmonary fibrosis": "Lung Opacity",
    "Lung cavity": "Lung Lesion",
    "Lung tumor": "Lung Lesion",
    "Nodule/Mass": "Lung Lesion",
    "Pleural effusion": "Pleural Effusion",
    "Pleural thickening": "Pleural Other",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
}
NO_FINDING = "No finding"
PHYSIONET_FILES = {"train": "annotations/image_labels_train.csv", "test": "annotations/image_labels_test.csv"}
KAGGLE_FILE = "train.csv"


def load(root, split: str | None = None) -> list[Record]:
    root = Path(root)
    if tables.find(root, PHYSIONET_FILES["train"], PHYSIONET_FILES["test"]):
        sources = [(tables.find(root, name), folder) for folder, name in PHYSIONET_FILES.items()]
        votes = [(path, folder, _physionet_votes(path)) for path, folder in sources if path]
    else:
        path = tables.require(root, KAGGLE_FILE, *PHYSIONET_FILES.values(), dataset="VinDr-CXR")
        votes = [(path, "train", _kaggle_votes(path))]
    records = []
    for path, folder, images in votes:
        classes = {c for image in images.values() for c in image.marks}
        graded = {VINDR_TO_CHEXPERT[c] for c in classes if c in VINDR_TO_CHEXPERT}
        for image_id, image in images.items():
            record_split = "test" if folder == "test" else hashed_split(f"vindr/{image_id}")
            if split and record_split != split:
                continue
            records.append(image.record(image_id, os.path.join(root, folder, f"{image_id}.dicom"), graded,
                                        record_split))
    return records


class _Votes:
    """The readers of one image and, per finding, the readers who marked it."""

    def __init__(self, origin: str):
        self.origin = origin
        self.readers: set[str] = set()
        self.marks: dict[str, set[str]] = collections.defaultdict(set)

    def record(self, image_id: str, image: str, graded, split: str) -> Record:
        majority = len(self.readers) / 2
        value = {c: 1.0 if len(r) > majority else -1.0 for c, r in self.marks.items() if r}
        findings = [c for c in value if c != NO_FINDING]
        found = [(VINDR_TO_CHEXPERT[c], value[c]) for c in findings if c in VINDR_TO_CHEXPERT]
        return Record(image=image, labels=mapped_labels(found, graded, normal=value.get(NO_FINDING) == 1.0),
                      report="", dataset="vindr", split=split, view=FRONTAL, study_id=image_id,
                      findings=tuple(c.lower() for c in findings if value[c] == 1.0), origin=self.origin)


def _physionet_votes(path: Path) -> dict[str, _Votes]:
    images: dict[str, _Votes] = {}
    finding_columns = None
    for origin, row in tables.rows(path, ("image_id",)):
        if finding_columns is None:
            finding_columns = [c for c in row if c not in ("image_id", "rad_id")]
        image = images.setdefault(row["image_id"], _Votes(origin))
        reader = row.get("rad_id") or "consensus"
        image.readers.add(reader)
        for column in finding_columns:
            cell = (row[column] or "").strip()
            if cell in ("", "0", "0.0"):
                image.marks[_canonical(column)]  # the finding is part of the file's vocabulary
            elif cell in ("1", "1.0"):
                image.marks[_canonical(column)].add(reader)
            else:
                raise InputError(f"{origin}: {column} has value {cell!r}; expected 0 or 1")
    return images


def _kaggle_votes(path: Path) -> dict[str, _Votes]:
    images: dict[str, _Votes] = {}
    for origin, row in tables.rows(path, ("image_id", "class_name", "rad_id")):
        image = images.setdefault(row["image_id"], _Votes(origin))
        image.readers.add(row["rad_id"])
        image.marks[_canonical(row["class_name"])].add(row["rad_id"])
    return images


def _canonical(name: str) -> str:
    """The test file's 'Other disease' is the train file's 'Other diseases'."""
    name = name.strip()
    return "Other diseases" if name == "Other disease" else name
