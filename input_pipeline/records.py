"""One record schema for every source, the rules that turn a source's own labels into it, and the stage views.

Label values follow the CheXpert labeler: 1 positive, 0 negative, -1 uncertain, NaN not given. A source that
grades only some observations (NIH, VinDr, ...) leaves the others NaN, so "not annotated" never reads as
"absent". No Finding is 0 when a source reports an abnormality that none of the 14 observations covers
(e.g. NIH's Emphysema): the record is abnormal even though no observation is positive.
"""

import dataclasses
import hashlib
from pathlib import Path
from typing import Collection, Iterable, Sequence

import numpy as np

from cxrllava_jax.domain.findings import CHEXPERT_OBSERVATIONS, NEGATIVE, POSITIVE, UNCERTAIN
from cxrllava_jax.errors import InputError

FRONTAL_VIEWS = ("PA", "AP")
# A frontal image whose source does not say AP or PA (frontal-only releases such as VinDr or BrixIA).
FRONTAL = "frontal"
# Sources without a published validation split are split train:validate = 8:1 by patient, the ratio of every
# dataset in the paper's Table 1.
VALIDATE_FRACTION = 1 / 9

_INDEX = {name: i for i, name in enumerate(CHEXPERT_OBSERVATIONS)}
# CheXpert's label hierarchy: Lung Opacity is the parent of these; a positive child makes the parent positive.
LUNG_OPACITY_CHILDREN = ("Edema", "Consolidation", "Pneumonia", "Lung Lesion", "Atelectasis")


@dataclasses.dataclass
class Record:
    # Path of the image file (it need not exist: see `require_images`), or a study's files in the order of its
    # `<image>` places (conversation files with an `"image": [..]` list).
    image: str | tuple[str, ...]
    labels: np.ndarray  # float32 [14] in CHEXPERT_OBSERVATIONS order: 1, 0, -1, or NaN (not given)
    report: str  # free text ('' when the source has none)
    dataset: str
    split: str  # 'train', 'validate' or 'test'
    view: str  # 'PA', 'AP' or FRONTAL
    study_id: str = ""
    conversations: list | None = None  # instruction turns when the source provides them
    findings: tuple = ()  # the source's own positive finding names (English), for keyword texts
    origin: str = ""  # the label-file row this record came from, for error messages


def sectioned_report(sections: Iterable[tuple[str, str]]) -> str:
    """The report text every adapter produces: 'FINDINGS: ...\n\nIMPRESSION: ...', whitespace collapsed, empty
    sections left out."""
    kept = [(name, " ".join(body.split())) for name, body in sections]
    return "\n\n".join(f"{name}: {body}" for name, body in kept if body)


_SPELLINGS = {"1": POSITIVE, "1.0": POSITIVE, "0": NEGATIVE, "0.0": NEGATIVE, "-1": UNCERTAIN, "-1.0": UNCERTAIN}


def labels_from(values: dict, origin: str) -> np.ndarray:
    """{observation: value} -> the label vector; values must be 1, 0, -1 (any float spelling) or empty."""
    out = [np.nan] * len(CHEXPERT_OBSERVATIONS)  # a list: this runs once per row of 200k-row tables
    for i, name in enumerate(CHEXPERT_OBSERVATIONS):
        raw = values.get(name) or ""
        value = _SPELLINGS.get(raw)
        if value is None and raw.strip():
            try:
                value = float(raw)
            except ValueError:
                pass
            if value not in (POSITIVE, NEGATIVE, UNCERTAIN):
                raise InputError(f"{origin}: {name} has value {raw!r}; expected 1, 0, -1 or empty")
        if value is not None:
            out[i] = value
    return np.array(out, np.float32)


def mapped_labels(found: Iterable[tuple[str, float]], graded: Collection[str], normal: bool | None) -> np.ndarray:
    """Labels of a source that grades only the observations in `graded`.

    `found` holds (observation, 1 or -1) pairs from the source's findings; a graded observation not found is 0,
    one found several times keeps its strongest value (1 over -1), one not graded stays NaN unless found.
    When Lung Opacity is graded it takes the strongest value of its children. `normal` sets No Finding:
    True -> 1, False (the source reports some abnormality) -> 0, None (the source does not say) -> NaN.
    """
    labels = [np.nan] * len(CHEXPERT_OBSERVATIONS)  # a list: this runs once per row of 100k-row tables
    for name in graded:
        labels[_INDEX[name]] = NEGATIVE
    for name, value in found:
        i = _INDEX[name]
        if labels[i] != POSITIVE:
            labels[i] = value
    if "Lung Opacity" in graded:
        children = [labels[_INDEX[c]] for c in LUNG_OPACITY_CHILDREN]
        opacity = _INDEX["Lung Opacity"]
        if POSITIVE in children:
            labels[opacity] = POSITIVE
        elif UNCERTAIN in children and labels[opacity] == NEGATIVE:
            labels[opacity] = UNCERTAIN
    labels[_INDEX["No Finding"]] = np.nan if normal is None else float(normal)
    return np.array(labels, np.float32)


def hashed_split(key: str, validate_fraction: float = VALIDATE_FRACTION) -> str:
    """'train' or 'validate' for a source without a published validation split.

    Decided by a hash of `key` (the patient, or the image when the source has no patient ids), so a patient's
    images stay on one side and the split is the same on every machine and run.
    """
    draw = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64
    return "validate" if draw < validate_fraction else "train"


def relative_name(path, root) -> str:
    """A file's name under a dataset root (what errors, TFDS keys and evaluation ids use); absolute if outside."""
    path, root = Path(str(path)), Path(root)
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def image_paths(image: str | tuple[str, ...]) -> tuple[str, ...]:
    """A record's image files: one, or a study's several."""
    return image if isinstance(image, tuple) else (image,)


def require_images(records: Sequence[Record]) -> None:
    """Raises an InputError naming the label rows whose image file is missing.

    Adapters build records from label files alone (so label files can be checked, counted and tested on a
    machine without the images); this is the separate step that checks the images are there.
    """
    missing = [(r, path) for r in records for path in image_paths(r.image) if not Path(path).is_file()]
    if missing:
        shown = "; ".join(f"{r.origin}: {path}" for r, path in missing[:5])
        raise InputError(f"{len(missing)} of {len(records)} records point at missing image files: {shown}"
                         + (" ..." if len(missing) > 5 else ""))


# ---------------------------------------------------------------- stage views

def is_abnormal(labels: np.ndarray, uncertain_policy: str = "abnormal") -> bool | None:
    """Stage 1A's binary target, or None when the record cannot be used.

    Abnormal: an observation other than No Finding / Support Devices is positive, or No Finding is 0 (the source
    reports an abnormality outside the 14 observations). Otherwise an uncertain (-1) observation counts as
    abnormal (`uncertain_policy='abnormal'`), normal ('normal') or drops the record ('exclude'). Normal: No
    Finding is 1 or some observation is graded negative. A record without any label is dropped.
    """
    if uncertain_policy not in ("abnormal", "normal", "exclude"):
        raise ValueError(f"uncertain_policy must be 'abnormal', 'normal' or 'exclude', got {uncertain_policy!r}")
    no_finding = labels[_INDEX["No Finding"]]
    findings = np.delete(labels, [_INDEX["No Finding"], _INDEX["Support Devices"]])
    if (findings == POSITIVE).any() or no_finding == NEGATIVE:
        return True
    if (findings == UNCERTAIN).any():
        return None if uncertain_policy == "exclude" else uncertain_policy == "abnormal"
    if no_finding == POSITIVE or (findings == NEGATIVE).any():
        return False
    return None


def keyword_text(labels: np.ndarray, findings: Sequence[str] = ()) -> str:
    """Stage 1B's label text, e.g. 'cardiomegaly, pleural effusion'; '' when the labels say nothing usable.

    The source's own finding names (`Record.findings`) when it has them, since they are richer than the 14
    observations (PadChest's 'hiatal hernia'); otherwise the positive observations; 'no finding' for a normal
    record.
    """
    names = list(dict.fromkeys(f.lower() for f in findings))
    if not names:
        names = [name.lower() for name, value in zip(CHEXPERT_OBSERVATIONS, labels)
                 if value == POSITIVE and name != "No Finding"]
    if names:
        return ", ".join(names)
    return "no finding" if labels[_INDEX["No Finding"]] == POSITIVE else ""
