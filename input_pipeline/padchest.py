"""PadChest as published: PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv (optionally .gz) with ImageID,
ImageDir (the numbered folder, 0..54, that holds the 16-bit PNG), PatientID, StudyID, Projection and Labels (a
Python list literal of English finding names, e.g. "['pleural effusion', 'cardiomegaly']"); images at
ImageDir/ImageID.

Frontal projections only: PA, AP and AP_horizontal (a supine AP; view 'AP'). Rows without labels and rows
labelled 'exclude' are dropped. The Report column is a stemmed Spanish text, not a report the model could
learn to write, so records carry no report. Splits: train:validate by patient (`hashed_split`); PadChest
publishes none.

PadChest findings in the CheXpert observations (our choice; phrases as our report labeler reads them,
`cxrllava_jax.domain.phrases`) are `PADCHEST_TO_CHEXPERT`; devices are Support Devices. Every other
finding (e.g. 'COPD signs', 'aortic elongation') makes No Finding 0 without a positive observation, except
`NOT_FINDINGS`, which describe the study rather than the patient; No Finding is 1 for 'normal' without
another finding (devices aside). PadChest's labels come from reports covering all 14 observations, so all 14
are graded.
"""

import ast
import functools
import os
from pathlib import Path

from cxrllava_jax.domain.findings import CHEXPERT_OBSERVATIONS
from input_pipeline import tables
from cxrllava_jax.errors import InputError
from input_pipeline.records import Record, hashed_split, mapped_labels

LABELS_FILE = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
VIEWS = {"PA": "PA", "AP": "AP", "AP_horizontal": "AP"}
NORMAL = "normal"
EXCLUDE = "exclude"
NOT_FINDINGS = {NORMAL, "unchanged", "suboptimal study", ""}

_GROUPS = {
    "Enlarged Cardiomediastinum": ("mediastinal enlargement", "superior mediastinal enlargement"),
    "Cardiomegaly": ("cardiomegaly",),
    "Lung Lesion": ("nodule", "multiple nodules", "pulmonary mass", "mass", "lung metastasis", "cavitation",
                    "abscess", "lepidic adenocarcinoma"),
    "Lung Opacity": ("infiltrates", "interstitial pattern", "reticular interstitial pattern",
                     "reticulonodular interstitial pattern", "alveolar pattern", "ground glass pattern",
                     "increased density", "miliary opacities", "pulmonary fibrosis", "fibrotic band"),
    "Edema": ("pulmonary edema", "kerley lines", "vascular redistribution", "central vascular redistribution"),
    "Consolidation": ("consolidation", "air bronchogram"),
    "Pneumonia": ("pneumonia", "atypical pneumonia"),
    "Atelectasis": ("atelectasis", "laminar atelectasis", "lobar atelectasis", "segmental atelectasis",
                    "atelectasis basal", "total atelectasis", "round atelectasis"),
    "Pneumothorax": ("pneumothorax", "hydropneumothorax"),
    "Pleural Effusion": ("pleural effusion", "loculated pleural effusion", "loculated fissural effusion",
                         "costophrenic angle blunting", "hydropneumothorax", "empyema"),
    "Pleural Other": ("pleural thickening", "apical pleural thickening", "calcified pleural thickening",
                      "pleural plaques", "calcified pleural plaques", "pleural mass"),
    "Fracture": ("fracture", "rib fracture", "callus rib fracture", "clavicle fracture", "humeral fracture",
                 "vertebral fracture"),
    "Support Devices": ("NSG tube", "endotracheal tube", "tracheostomy tube", "chest drain tube",
                        "ventriculoperitoneal drain tube", "gastrostomy tube", "nephrostomy tube", "catheter",
                        "central venous catheter", "central venous catheter via jugular vein",
                        "central venous catheter via subclavian vein", "central venous catheter via umbilical vein",
                        "reservoir central venous catheter", "pacemaker", "dual chamber device",
                        "single chamber device", "electrical device", "artificial heart valve",
                        "artificial mitral heart valve", "artificial aortic heart valve", "double J stent",
                        "aortic endoprosthesis", "endoprosthesis"),
}
PADCHEST_TO_CHEXPERT: dict[str, list[str]] = {}
for _observation, _names in _GROUPS.items():
    for _name in _names:
        PADCHEST_TO_CHEXPERT.setdefault(_name, []).append(_observation)
DEVICES = set(_GROUPS["Support Devices"])
COLUMNS = ("ImageID", "ImageDir", "PatientID", "StudyID", "Projection", "Labels")


def load(root, split: str | None = None) -> list[Record]:
    root = Path(root)
    path = tables.require(root, LABELS_FILE, dataset="PadChest")
    records = []
    for origin, row in tables.rows(path, COLUMNS):
        view = VIEWS.get(row["Projection"])
        if view is None:
            continue
        record_split = hashed_split(f"padchest/{row['PatientID']}")
        if split and record_split != split:
            continue
        names = _labels(row["Labels"], origin)
        if not names or EXCLUDE in names:
            continue
        findings = [n for n in names if n not in NOT_FINDINGS]
        found = [(o, 1.0) for n in findings for o in PADCHEST_TO_CHEXPERT.get(n, ())]
        abnormal = any(f not in DEVICES for f in findings)
        records.append(Record(
            image=os.path.join(root, row["ImageDir"], row["ImageID"]),
            labels=mapped_labels(found, CHEXPERT_OBSERVATIONS, normal=False if abnormal else NORMAL in names or None),
            report="", dataset="padchest", split=record_split, view=view, study_id=row["StudyID"],
            findings=tuple(findings), origin=origin))
    return records


def _labels(cell: str, origin: str) -> tuple[str, ...]:
    """The Labels cell's finding names, stripped; () for an empty cell."""
    text = cell.strip()
    if not text or text.lower() == "nan":
        return ()
    try:
        return _parse_labels(text)
    except (ValueError, SyntaxError) as error:
        raise InputError(f"{origin}: Labels {text[:80]!r} is not a Python list of strings ({error})") from None


@functools.lru_cache(maxsize=65536)  # a few thousand distinct label lists cover the 160k rows
def _parse_labels(text: str) -> tuple[str, ...]:
    names = ast.literal_eval(text)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError("not a list of strings")
    return tuple(n.strip() for n in names)
