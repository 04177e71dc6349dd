"""Reads the 14 labels out of a model's answer to the label-generation prompt (paper, Figure 2b: JSON labels).

Models wrap JSON in code fences and chat, use single quotes, trailing commas or Python literals, stop mid-object,
name findings loosely ("effusion", "pleural_effusion") and write values as 1, true, "yes", "positive".
Strict JSON is tried first, then a repaired version, then `"name": value` pairs found anywhere in the text.
A result with no recognised finding counts as unparsed; unknown names and values are listed, not guessed.
"""

import dataclasses
import json
import math
import re

from cxrllava_jax.domain.findings import CHEXPERT_OBSERVATIONS, NEGATIVE, POSITIVE, UNCERTAIN

_SYNONYMS = {
    "No Finding": ("no finding", "no findings", "normal", "no abnormality", "no acute findings"),
    "Enlarged Cardiomediastinum": ("enlarged cardiomediastinum", "widened mediastinum", "mediastinal widening",
                                   "cardiomediastinal enlargement", "enlarged mediastinum"),
    "Cardiomegaly": ("cardiomegaly", "enlarged heart", "cardiac enlargement", "enlarged cardiac silhouette"),
    "Lung Lesion": ("lung lesion", "lung lesions", "nodule", "nodules", "lung nodule", "mass", "lung mass",
                    "pulmonary nodule", "pulmonary mass"),
    "Lung Opacity": ("lung opacity", "opacity", "opacities", "airspace opacity", "pulmonary opacity", "infiltrate"),
    "Edema": ("edema", "oedema", "pulmonary edema", "pulmonary oedema"),
    "Consolidation": ("consolidation",),
    "Pneumonia": ("pneumonia",),
    "Atelectasis": ("atelectasis",),
    "Pneumothorax": ("pneumothorax",),
    "Pleural Effusion": ("pleural effusion", "pleural effusions", "effusion", "effusions"),
    "Pleural Other": ("pleural other", "other pleural", "pleural thickening", "other pleural abnormality"),
    "Fracture": ("fracture", "fractures", "rib fracture", "bone fracture"),
    "Support Devices": ("support devices", "support device", "devices", "medical devices", "lines and tubes",
                        "tubes and lines"),
}
_VALUES = {
    POSITIVE: ("1", "1.0", "true", "yes", "y", "positive", "present", "pos", "abnormal", "detected"),
    NEGATIVE: ("0", "0.0", "false", "no", "n", "negative", "absent", "neg", "not present", "none", "normal",
               "not detected"),
    UNCERTAIN: ("-1", "-1.0", "uncertain", "possible", "possibly", "maybe", "probable", "equivocal", "indeterminate",
                "unsure"),
}


def _key(name):
    """'Pleural_Effusion', 'pleural-effusion', 'PleuralEffusion' -> 'pleuraleffusion'."""
    return re.sub(r"[^a-z]", "", name.lower())


_FINDING_BY_KEY = {_key(s): finding for finding, names in _SYNONYMS.items() for s in names}
_VALUE_BY_TEXT = {text: value for value, texts in _VALUES.items() for text in texts}
_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)(?:```|$)", re.DOTALL)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")
_PAIR = re.compile(r"""["']?([A-Za-z][A-Za-z _/-]{1,40}?)["']?\s*[:=]\s*["']?(-?[\w.]+(?: [a-z]+)?)""")


@dataclasses.dataclass
class ParsedLabels:
    labels: dict  # finding -> POSITIVE / NEGATIVE / UNCERTAIN / NaN (not given)
    parsed: bool  # at least one finding was recognised
    unknown: list  # names or values that were not understood

    def as_row(self):
        return [self.labels[o] for o in CHEXPERT_OBSERVATIONS]


def parse_json_labels(text: str) -> ParsedLabels:
    candidate = _candidate(text or "")
    obj = _load(candidate)
    pairs = _pairs_from_object(obj) if obj is not None else [(m[1], m[2]) for m in _PAIR.finditer(candidate)]
    labels = {o: math.nan for o in CHEXPERT_OBSERVATIONS}
    unknown = []
    for name, raw_value in pairs:
        finding = _FINDING_BY_KEY.get(_key(str(name)))
        value = _value(raw_value)
        if finding is None or value is None:
            unknown.append(f"{name}: {raw_value}")
        elif not math.isnan(value):
            labels[finding] = value
    recognised = any(not math.isnan(v) for v in labels.values())
    return ParsedLabels(labels, recognised, unknown)


def _candidate(text):
    """The part of the answer that should hold the JSON: inside a code fence, from the first brace on."""
    fenced = _FENCE.search(text)
    body = fenced.group(1) if fenced else text
    start = min((i for i in (body.find("{"), body.find("[")) if i >= 0), default=-1)
    return body[start:] if start >= 0 else body


def _load(candidate):
    """The JSON value at the start of `candidate`, after repairs if needed; None if there is none."""
    repaired = _repair(candidate)
    last_member_cut = repaired[: repaired.rfind(",")] if "," in repaired else repaired
    for attempt in (candidate, repaired, _close(repaired), _close(last_member_cut)):
        if attempt is None:
            continue
        try:
            return json.JSONDecoder().raw_decode(attempt)[0]
        except ValueError:
            continue
    return None


def _repair(text):
    text = text.replace("'", '"')
    text = re.sub(r"\bTrue\b", "true", re.sub(r"\bFalse\b", "false", re.sub(r"\bNone\b", "null", text)))
    return _TRAILING_COMMA.sub(r"\1", text)


def _close(text):
    """Closes the brackets a truncated answer left open, innermost first; None when it stopped inside a string,
    whose value ("pos" of "positive") cannot be trusted."""
    closers, in_string = [], False
    for ch in text:
        if ch == '"':
            in_string = not in_string
        elif not in_string and ch in "{[":
            closers.append("}" if ch == "{" else "]")
        elif not in_string and ch in "}]" and closers:
            closers.pop()
    return None if in_string else text + "".join(reversed(closers))


def _pairs_from_object(obj):
    """(name, value) pairs of a label object; a list of names means those findings are positive."""
    if isinstance(obj, list):
        return [(item, 1) for item in obj if isinstance(item, str)] or [
            pair for item in obj if isinstance(item, dict) for pair in _pairs_from_object(item)
        ]
    if not isinstance(obj, dict):
        return []
    pairs = []
    for name, value in obj.items():
        if isinstance(value, (dict, list)) and _key(str(name)) not in _FINDING_BY_KEY:
            pairs.extend(_pairs_from_object(value))  # {"labels": {...}} or {"findings": [...]}
        else:
            pairs.append((name, value))
    return pairs


def _value(raw):
    """POSITIVE / NEGATIVE / UNCERTAIN, NaN for an explicit null, None when not understood."""
    if raw is None:
        return math.nan
    if isinstance(raw, bool):
        return POSITIVE if raw else NEGATIVE
    if isinstance(raw, (int, float)):
        return float(raw) if float(raw) in (POSITIVE, NEGATIVE, UNCERTAIN) else None
    text = str(raw).strip().lower()
    if text in ("", "null", "nan", "n/a"):
        return math.nan
    return _VALUE_BY_TEXT.get(text)
