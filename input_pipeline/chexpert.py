"""CheXpert as published, in its release folder (CheXpert-v1.0 or CheXpert-v1.0-small):

- train.csv / valid.csv: Path, Sex, Age, Frontal/Lateral, AP/PA and the 14 observations (1.0 / 0.0 / -1.0 /
  empty), one row per image; Path starts with the release folder's name, e.g.
  CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg;
- the test set's radiologist labels: groundtruth.csv (rajpurkarlab/cheXpert-test-set-labels: Study + the 14
  observations as 0/1, one row per study, Study like CheXpert-v1.0/test/patient64741/study1), whose frontal
  images are the study folder's view*_frontal.jpg.

Splits are the published ones: train.csv -> 'train', valid.csv -> 'validate', the test labels -> 'test' (the
paper's CheXpert internal test set). Frontal images only.
"""

import os
from pathlib import Path

from input_pipeline import tables
from cxrllava_jax.errors import ConfigError, InputError
from input_pipeline.records import FRONTAL, FRONTAL_VIEWS, Record, labels_from

SPLIT_FILES = {"train": ("train.csv",), "validate": ("valid.csv",), "test": ("groundtruth.csv",)}


def load(root, split: str | None = None) -> list[Record]:
    """Records of `split`, or of every split whose label file is present when `split` is None."""
    root = Path(root)
    if split is not None and split not in SPLIT_FILES:
        raise ConfigError(f"CheXpert splits are {sorted(SPLIT_FILES)}, got {split!r}")
    wanted = [split] if split else list(SPLIT_FILES)
    files = {s: tables.find(root, *SPLIT_FILES[s]) for s in wanted}
    if split and files[split] is None:
        tables.require(root, *SPLIT_FILES[split], dataset="CheXpert")
    if not any(files.values()):
        raise InputError(f"{root}: no CheXpert label file (train.csv, valid.csv, groundtruth.csv)")
    records = []
    for name, path in files.items():
        if path is not None:
            records += _read(root, path, name)
    return records


def _read(root: Path, path: Path, split: str) -> list[Record]:
    if "Study" in tables.header(path):
        return _study_rows(root, path, split)
    records = []
    for origin, row in tables.rows(path, ("Path", "Frontal/Lateral", "AP/PA")):
        if row["Frontal/Lateral"] != "Frontal":
            continue
        image = _resolve(root, row["Path"], origin)
        view = row["AP/PA"]
        records.append(Record(
            image=image, labels=labels_from(row, origin), report="", dataset="chexpert", split=split,
            view=view if view in FRONTAL_VIEWS else FRONTAL, study_id=_study(image), origin=origin))
    return records


def _study_rows(root: Path, path: Path, split: str) -> list[Record]:
    records = []
    for origin, row in tables.rows(path, ("Study",)):
        study = Path(_resolve(root, row["Study"], origin))
        labels = labels_from(row, origin)
        # Without the images the study's first frontal view is where CheXpert's naming puts it.
        images = sorted(study.glob("view*_frontal.jpg")) or [study / "view1_frontal.jpg"]
        records += [Record(image=str(image), labels=labels.copy(), report="", dataset="chexpert", split=split,
                           view=FRONTAL, study_id=_study(str(image)), origin=origin) for image in images]
    return records


def _resolve(root: Path, published: str, origin: str) -> str:
    """A published path (starting with the release folder's name) -> the same file under `root`."""
    release, _, inside = published.strip().partition("/")
    if not release or not inside:
        raise InputError(f"{origin}: path {published!r} does not start with the release folder")
    return os.path.join(root, inside)


def _study(image: str) -> str:
    """'.../patient00001/study1/view1_frontal.jpg' -> 'patient00001/study1'."""
    return "/".join(image.split("/")[-3:-1])
