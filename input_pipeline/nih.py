"""NIH ChestX-ray14 as published: Data_Entry_2017_v2020.csv (or the original Data_Entry_2017.csv) with
'Image Index', 'Finding Labels' ('|'-separated, or 'No Finding'), 'Patient ID' and 'View Position' (PA/AP; all
images are frontal), the official split lists train_val_list.txt / test_list.txt, and the PNGs under
images/ (the box download) or images_NNN/images/ (the Kaggle copy).

Splits: test_list.txt -> 'test'; the rest (train_val_list.txt) is split train:validate by patient
(`hashed_split`). Without test_list.txt (e.g. only the label file at hand) every image is split that way.

NIH's 14 findings in the CheXpert observations (our choice, matching what our report labeler reads as that
observation, `cxrllava_jax.domain.phrases`): Effusion -> Pleural Effusion; Infiltration and Fibrosis ->
Lung Opacity; Mass and Nodule -> Lung Lesion; Pleural_Thickening -> Pleural Other; Atelectasis, Cardiomegaly,
Consolidation, Edema, Pneumonia, Pneumothorax -> themselves. Emphysema and Hernia have no CheXpert
observation: they make No Finding 0 (abnormal) without a positive observation. The observations NIH does not
grade (Enlarged Cardiomediastinum, Fracture, Support Devices) stay NaN.
"""

import os
from pathlib import Path

from input_pipeline import tables
from cxrllava_jax.errors import InputError
from input_pipeline.records import FRONTAL_VIEWS, Record, hashed_split, mapped_labels

NIH_TO_CHEXPERT = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
    "Effusion": "Pleural Effusion",
    "Emphysema": None,
    "Fibrosis": "Lung Opacity",
    "Hernia": None,
    "Infiltration": "Lung Opacity",
    "Mass": "Lung Lesion",
    "Nodule": "Lung Lesion",
    "Pleural_Thickening": "Pleural Other",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
}
NO_FINDING = "No Finding"
GRADED = sorted({o for o in NIH_TO_CHEXPERT.values() if o})
COLUMNS = ("Image Index", "Finding Labels", "Patient ID", "View Position")


def load(root, split: str | None = None) -> list[Record]:
    root = Path(root)
    entries = tables.require(root, "Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv", dataset="NIH ChestX-ray14")
    test_images = _test_images(root)
    image_dir = _image_locator(root)
    records = []
    for origin, row in tables.rows(entries, COLUMNS):
        if row["View Position"] not in FRONTAL_VIEWS:
            continue
        name, patient = row["Image Index"], row["Patient ID"]
        record_split = "test" if name in test_images else hashed_split(f"nih/{patient}")
        if split and record_split != split:
            continue
        findings = _findings(row["Finding Labels"], origin)
        records.append(Record(
            image=os.path.join(image_dir(name), name),
            labels=mapped_labels([(NIH_TO_CHEXPERT[f], 1.0) for f in findings if NIH_TO_CHEXPERT[f]], GRADED,
                                 normal=not findings),
            report="", dataset="nih", split=record_split, view=row["View Position"], study_id=name,
            findings=tuple(f.replace("_", " ").lower() for f in findings), origin=origin))
    return records


def _findings(cell: str, origin: str) -> list[str]:
    names = [n.strip() for n in cell.split("|") if n.strip()]
    if names == [NO_FINDING]:
        return []
    unknown = [n for n in names if n not in NIH_TO_CHEXPERT]
    if unknown or not names:
        raise InputError(f"{origin}: unknown NIH finding label(s) {unknown or [cell]}; expected 'No Finding' or "
                         f"'|'-separated names from {sorted(NIH_TO_CHEXPERT)}")
    return names


def _test_images(root: Path) -> set[str]:
    """The official test images. train_val_list.txt needs no reading: its images are the rest of the release."""
    test_list = root / "test_list.txt"
    return set(tables.read_lines(test_list)) if test_list.is_file() else set()


def _image_locator(root: Path):
    """image name -> its folder: images/ or, for the Kaggle copy, the images_NNN/images/ that holds it."""
    default = str(root / "images")
    shards = sorted(root.glob("images_*/images"))
    if not shards:
        return lambda name: default
    where = {name: str(shard) for shard in shards for name in os.listdir(shard)}
    return lambda name: where.get(name, default)
