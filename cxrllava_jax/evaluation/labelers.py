"""The report labelers eval.py and `cxrllava label` can use; each turns report texts into (n, 14) labels.

- "ours": the CheXpert-style rules in `cxrllava_jax.domain.labeler` (no model, thousands of reports a second).
- "chexpert-csv": labels made elsewhere, read from a CSV the CheXpert labeler or CheXbert wrote (text column plus
  the 14 observations); every report to label must appear in it (matched by its text, whitespace collapsed).
- "chexbert": CheXbert run through the `f1chexbert` package on a local `chexbert.pth` checkpoint.
"""

import dataclasses
import pickle
from pathlib import Path
from typing import Callable

import numpy as np

from cxrllava_jax.domain import label_files, labeler
from cxrllava_jax.domain.findings import CHEXPERT_OBSERVATIONS
from cxrllava_jax.errors import ConfigError

CHOICES = ("ours", "chexpert-csv", "chexbert")
# CheXbert's output heads: its own order of the observations, and its classes -> CheXpert label values.
_CHEXBERT_ORDER = (
    "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia",
    "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices", "No Finding")
_CHEXBERT_CLASSES = np.array([np.nan, 1.0, 0.0, -1.0])  # blank, positive, negative, uncertain


class LabelerUnavailable(ConfigError):
    """The chosen labeler cannot run here; the message says what is missing."""


@dataclasses.dataclass(frozen=True)
class Labeler:
    name: str  # what tables and results.json say made the labels
    label_reports: Callable[[list], np.ndarray]


def make(choice: str, labels_csv=None, chexbert_checkpoint=None) -> Labeler:
    if choice == "ours":
        return Labeler("ours (CheXpert-style rules)", labeler.label_reports)
    if choice == "chexpert-csv":
        return _from_label_file(labels_csv)
    if choice == "chexbert":
        return _chexbert(chexbert_checkpoint)
    raise LabelerUnavailable(f"labeler {choice!r}: expected one of {', '.join(CHOICES)}")


def _text_key(text: str) -> str:
    return " ".join(text.split())


def _require_file(path, needed: str):
    """None: say what is needed; a path that is not a file: name it and say what it is instead."""
    if not path:
        raise LabelerUnavailable(f"{needed}; none was given")
    if not Path(path).is_file():
        state = "is a directory" if Path(path).is_dir() else "does not exist"
        raise LabelerUnavailable(f"{path}: {state}; {needed}")


def _from_label_file(path) -> Labeler:
    _require_file(path, "the chexpert-csv labeler needs the label CSV of every report (--labels-csv FILE; "
                        "eval.py --labels_csv=FILE)")
    table = label_files.read_labels_csv(path)
    if not any(table.reports):
        raise LabelerUnavailable(f"{path}: no report text column (Reports or Report Impression) to match reports by")
    by_text = {_text_key(text): row for text, row in zip(table.reports, table.labels)}

    def label_reports(reports):
        missing = [r for r in reports if _text_key(r) not in by_text]
        if missing:
            raise LabelerUnavailable(f"{path}: no labels for {len(missing)} of {len(reports)} reports, "
                                     f"e.g. {missing[0][:80]!r}")
        return np.array([by_text[_text_key(r)] for r in reports], dtype=np.float64).reshape(-1, 14)

    return Labeler(f"chexpert-csv ({Path(path).name})", label_reports)


def _chexbert(checkpoint) -> Labeler:
    _require_file(checkpoint, "the chexbert labeler needs CheXbert's checkpoint file (chexbert.pth, e.g. from "
                              "StanfordAIMI/RRG_scorers)")
    try:
        import pandas
        import torch
        from f1chexbert import f1chexbert
        from transformers import BertTokenizer
    except ImportError as error:
        raise LabelerUnavailable(f"the chexbert labeler needs the f1chexbert package (pip install f1chexbert): "
                                 f"{error}") from None
    try:
        tokenizer = BertTokenizer.from_pretrained("bert-base-uncased")
        model = f1chexbert.bert_labeler(inference=True)
    except OSError as error:
        raise LabelerUnavailable(f"CheXbert needs bert-base-uncased's tokenizer and configuration in the Hugging Face "
                                 f"cache: {error}") from None
    try:
        state = torch.load(checkpoint, map_location="cpu")["model_state_dict"]
    except (pickle.UnpicklingError, KeyError, RuntimeError) as error:
        raise LabelerUnavailable(f"{checkpoint}: not a CheXbert checkpoint ({error!r})") from None
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()}, strict=False)
    model.eval()
    columns = [_CHEXBERT_ORDER.index(o) for o in CHEXPERT_OBSERVATIONS]

    def label_reports(reports):
        rows = []
        with torch.no_grad():
            for report in reports:
                ids = torch.LongTensor(f1chexbert.tokenize(pandas.Series([report]), tokenizer))
                heads = model(ids, torch.ones_like(ids, dtype=torch.float))
                classes = np.array([int(h.argmax(dim=1).item()) for h in heads])
                rows.append(_CHEXBERT_CLASSES[classes][columns])
        return np.array(rows, dtype=np.float64).reshape(-1, 14)

    return Labeler(f"chexbert ({Path(checkpoint).name})", label_reports)
