"""One record schema for every source, and the stage views built from it."""

import dataclasses

import numpy as np

from cxrllava_jax.findings import CHEXPERT_OBSERVATIONS

FRONTAL_VIEWS = ("PA", "AP")


@dataclasses.dataclass
class Record:
    image: str  # path of the image file
    labels: np.ndarray  # float32 [14] in CHEXPERT_OBSERVATIONS order: 1, 0, -1, or NaN (not given)
    report: str  # free text ('' when the source has none)
    dataset: str
    split: str
    view: str
    study_id: str = ""
    conversations: list | None = None  # instruction turns when the source provides them


def labels_from(values: dict, origin: str) -> np.ndarray:
    """{observation: value} -> the label vector; values must be 1, 0, -1 or empty."""
    out = np.full(len(CHEXPERT_OBSERVATIONS), np.nan, np.float32)
    for i, name in enumerate(CHEXPERT_OBSERVATIONS):
        raw = values.get(name)
        if raw in (None, ""):
            continue
        value = float(raw)
        if value not in (1.0, 0.0, -1.0):
            raise ValueError(f"{origin}: {name} has value {raw!r}; expected 1, 0, -1 or empty")
        out[i] = value
    return out


# ---------------------------------------------------------------- stage views

def is_abnormal(labels: np.ndarray, uncertain_policy: str = "abnormal") -> bool | None:
    """Stage 1A's binary target. Abnormal: any observation other than No Finding / Support Devices positive.

    Uncertain (-1) counts as abnormal (`uncertain_policy='abnormal'`), normal ('normal') or drops the
    record ('exclude', returns None). A record without any label is dropped too.
    """
    findings = np.delete(labels, [CHEXPERT_OBSERVATIONS.index("No Finding"),
                                  CHEXPERT_OBSERVATIONS.index("Support Devices")])
    if (findings == 1).any():
        return True
    if (findings == -1).any():
        if uncertain_policy == "exclude":
            return None
        if uncertain_policy not in ("abnormal", "normal"):
            raise ValueError(f"uncertain_policy must be 'abnormal', 'normal' or 'exclude', got {uncertain_policy!r}")
        return uncertain_policy == "abnormal"
    if labels[CHEXPERT_OBSERVATIONS.index("No Finding")] == 1 or (findings == 0).any():
        return False
    return None


def keyword_text(labels: np.ndarray) -> str:
    """Stage 1B's label text: the positive observations as keywords, e.g. 'cardiomegaly, pleural effusion'."""
    positives = [name.lower() for name, value in zip(CHEXPERT_OBSERVATIONS, labels)
                 if value == 1 and name != "No Finding"]
    return ", ".join(positives) if positives else "no finding"
