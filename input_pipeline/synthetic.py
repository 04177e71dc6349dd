"""The embedded synthetic chest X-ray dataset: findings drawn into the pixels, reports that describe them.

`cxrllava synth --out DIR --num N --image-size S --seed K` writes the MIMIC-CXR-JPG layout (images under
files/pXX/pSUBJECT/sSTUDY/, the metadata, CheXpert-label and split CSVs, and the MIMIC-CXR reports), so
the MIMIC adapter reads it like the real thing, plus `synthetic-instructions.jsonl` with question/answer
turns about each study (the paper's GPT-4 instruction data, here written from the drawn ground truth).
A study has no finding or up to three of: pleural effusion, cardiomegaly, pneumothorax, consolidation, edema,
atelectasis, nodule (a mass when large) and an endotracheal tube, each with the side and size or degree that
its drawing, its report sentence and the answers about it share. Reports vary their phrasing and negate the
main findings that are absent, so the CheXpert-style labeler reads back exactly the labels written.
Everything is a function of the seed: the same seed gives the same bytes.

`cxrllava synth --studies --out DIR` writes instead a set of studies that needs the prior (`write_studies`):
each has a prior frontal film with its report, and a current frontal and lateral film whose findings appeared,
resolved, grew, shrank or stayed since; the current report says which ("..., not seen previously: new.", "The
previously seen ... has resolved.", "Moderate ..., previously small: increased.", "..., previously moderate:
unchanged."). It is written as LLaVA conversation files for fine-tuning: the study
(`studies-SPLIT.jsonl`, three images and the prior report) and the same reports against the current frontal film
alone (`single-SPLIT.jsonl`, the baseline that cannot know what changed).
"""

import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from cxrllava_jax import arguments, files
from cxrllava_jax.domain.findings import CHEXPERT_OBSERVATIONS, DIFFERENTIALS

# `cxrllava synth` bounds: drawing holds int64 coordinate planes of the whole image (0.27 GB at 4096 pixels).
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE, MAX_STUDIES = 8, 4096, 10_000_000
SEVERITIES = ("small", "moderate", "large")  # size of an effusion, pneumothorax, consolidation or nodule
DEGREES = ("mild", "moderate", "severe")  # degree of cardiomegaly or edema
SPLIT_FRACTIONS = (("train", 0.8), ("validate", 0.1), ("test", 0.1))
# The study set is made larger than the image set (a study's report depends on three images and a text), so a smaller
# share of it holds out as many studies.
STUDY_SPLIT_FRACTIONS = (("train", 0.9), ("validate", 0.05), ("test", 0.05))


@dataclasses.dataclass(frozen=True)
class Finding:
    name: str
    side: str = ""  # 'left' / 'right' / '' (bilateral or central)
    severity: str = ""  # one of the kind's grades (SEVERITIES or DEGREES), or ''
    zone: str = ""  # 'upper' / 'lower'


@dataclasses.dataclass(frozen=True)
class FindingKind:
    """Everything the dataset knows about one kind of finding; adding a finding is adding one entry to KINDS."""

    observation: str  # the CheXpert observation it is labelled as
    draw: Callable | None  # (image, finding, x, y, lungs, rng) -> image; None: the anatomy draws it (the heart)
    sentences: Callable[[Finding], list[str]]  # the report's phrasings of it, one chosen per report
    impression: Callable[[Finding], str] | None = None  # the impression's phrase; None: not an abnormality
    noun: Callable[[Finding], str] | None = None  # what a follow-up question calls it ('Which side is the ... on?')
    grades: tuple[str, ...] = ()  # how large or how bad it can be
    sided: bool = False
    zoned: bool = False  # upper or lower lung
    negation: str = ""  # its phrase in the report's joint negation of absent findings ('No A, B or C.')
    normal: tuple[str, ...] = ()  # what a report may say when it is absent, in its own sentence...
    normal_chance: float = 1.0  # ...this often
    leads: bool = False  # its sentence (or `normal`) opens the findings
    question: tuple[str, str] | None = None  # a yes/no question about it, and the answer when it is absent


@dataclasses.dataclass
class Study:
    subject_id: int
    study_id: int
    dicom_id: str
    split: str
    findings: list[Finding]
    report: str = ""
    labels: dict = dataclasses.field(default_factory=dict)
    conversations: list = dataclasses.field(default_factory=list)


def _lesion(f: Finding) -> str:
    return "mass" if f.severity == "large" else "nodule"


# ---------------------------------------------------------------- drawing

def draw_radiograph(findings: list[Finding], size: int, rng: np.random.Generator) -> np.ndarray:
    """A PA chest radiograph as uint8 [size, size]: bright bone and soft tissue, dark lungs."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = 0.15 + 0.05 * rng.random()
    body = _ellipse(x, y, 0.5, 0.55, 0.46, 0.52)
    img = img + 0.35 * body
    lungs = {}
    for side, cx in (("right", 0.31), ("left", 0.69)):  # the patient's right is the image's left
        lung = _ellipse(x, y, cx + rng.normal(0, 0.01), 0.5, 0.15, 0.3) * (y < 0.78)
        lungs[side] = lung
        img = img - 0.3 * lung
    for k in range(6):  # ribs: faint bright arcs over the lungs
        rib = np.exp(-(((y - 0.3 - 0.08 * k) - 0.15 * (x - 0.5) ** 2 * 4) ** 2) / 2e-4)
        img = img + 0.06 * rib * (lungs["right"] + lungs["left"])
    enlarged = {f.name: f.severity for f in findings}.get("cardiomegaly")
    heart_width = {None: 0.12, "mild": 0.165, "moderate": 0.205, "severe": 0.245}[enlarged]
    heart = _ellipse(x, y, 0.53, 0.62, heart_width + rng.normal(0, 0.008), 0.14)
    img = img + 0.4 * heart + 0.3 * _ellipse(x, y, 0.5, 0.35, 0.05, 0.2)  # heart and mediastinum
    img = img + 0.4 * (y > 0.78 + 0.05 * np.abs(x - 0.5)) * body  # diaphragm and abdomen
    for f in findings:
        if KINDS[f.name].draw is not None:
            img = KINDS[f.name].draw(img, f, x, y, lungs, rng)
    img = img + rng.normal(0, 0.025, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _ellipse(x, y, cx, cy, rx, ry):
    return (((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0).astype(np.float32)


def _blob(x, y, cx, cy, r):
    return np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))


def _centre(f: Finding) -> float:
    return 0.31 if f.side == "right" else 0.69


def _lung(f: Finding, lungs):
    return lungs.get(f.side, lungs["right"] + lungs["left"])


def _scale(f: Finding) -> float:
    return {"small": 0.6, "moderate": 1.0, "large": 1.45}.get(f.severity, 1.0)


def _draw_effusion(img, f, x, y, lungs, rng):  # fluid fills the lung base with a meniscus
    level = 0.78 - 0.12 * _scale(f) + 0.04 * np.abs(x - _centre(f)) / 0.15
    return img + 0.45 * _lung(f, lungs) * (y > level)


def _draw_pneumothorax(img, f, x, y, lungs, rng):  # a lucent rim along the apex and lateral wall, no markings
    cx, scale = _centre(f), _scale(f)
    rim = _lung(f, lungs) * (_ellipse(x, y, cx, 0.5, 0.15, 0.3) - _ellipse(
        x, y, cx + (0.04 if f.side == "right" else -0.04), 0.55, 0.15 - 0.05 * scale, 0.3 - 0.07 * scale))
    return img - 0.3 * np.clip(rim, 0, 1)


def _draw_consolidation(img, f, x, y, lungs, rng):
    cy = 0.4 if f.zone == "upper" else 0.62
    return img + 0.45 * _lung(f, lungs) * (_blob(x, y, _centre(f), cy, 0.06 * _scale(f)) > 0.35)


def _draw_edema(img, f, x, y, lungs, rng):  # bilateral perihilar haze
    density = {"mild": 0.18, "moderate": 0.3, "severe": 0.45}.get(f.severity, 0.3)
    return img + density * _lung(f, lungs) * (_blob(x, y, 0.36, 0.5, 0.09) + _blob(x, y, 0.64, 0.5, 0.09))


def _draw_atelectasis(img, f, x, y, lungs, rng):  # a horizontal band at the base
    cx = _centre(f)
    band = np.exp(-((y - 0.68 + 0.1 * (x - cx)) ** 2) / (2 * 0.012 ** 2))
    return img + 0.5 * _lung(f, lungs) * band * (np.abs(x - cx) < 0.12)


def _draw_nodule(img, f, x, y, lungs, rng):  # a large one is a mass
    cy = 0.38 if f.zone == "upper" else 0.6
    radius = {"small": 0.02, "moderate": 0.03, "large": 0.05}.get(f.severity, 0.03)
    return img + 0.55 * (_blob(x, y, _centre(f) + rng.normal(0, 0.02), cy, radius) > 0.5)


def _draw_device(img, f, x, y, lungs, rng):  # an endotracheal tube down the midline
    return img + 0.5 * ((np.abs(x - 0.5) < 0.012) & (y < 0.38)).astype(np.float32)


# ---------------------------------------------------------------- the findings

def _capitalised(text: str) -> str:
    return text[0].upper() + text[1:]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


KINDS: dict[str, FindingKind] = {
    "effusion": FindingKind(
        "Pleural Effusion", _draw_effusion, grades=SEVERITIES, sided=True, negation="pleural effusion",
        sentences=lambda f: [f"There is a {f.severity} {f.side} pleural effusion.",
                             f"{_capitalised(f.severity)} {f.side} pleural effusion.",
                             f"A {f.severity} {f.side} pleural effusion is present."],
        impression=lambda f: f"{f.severity} {f.side} pleural effusion", noun=lambda f: "pleural effusion",
        question=("Is there a pleural effusion?", "No. There is no pleural effusion.")),
    "cardiomegaly": FindingKind(
        "Cardiomegaly", None, grades=DEGREES, leads=True,
        sentences=lambda f: {"mild": ["The heart is mildly enlarged.", "Mild cardiomegaly."],
                             "moderate": ["There is moderate cardiomegaly.", "The heart is moderately enlarged."],
                             "severe": ["Severe cardiomegaly.", "The heart is markedly enlarged."],
                             }.get(f.severity, ["Cardiomegaly."]),
        normal=("Heart size is normal.", "The cardiac silhouette is normal in size.",
                "Heart size is within normal limits."),
        impression=lambda f: f"{f.severity} cardiomegaly", noun=lambda f: "cardiomegaly",
        question=("Is the heart enlarged?", "No. The heart size is normal.")),
    "pneumothorax": FindingKind(
        "Pneumothorax", _draw_pneumothorax, grades=SEVERITIES, sided=True, negation="pneumothorax",
        sentences=lambda f: [f"There is a {f.severity} {f.side} pneumothorax.",
                             f"{_capitalised(f.severity)} {f.side} apical pneumothorax.",
                             f"A {f.severity} {f.side} pneumothorax is seen."],
        impression=lambda f: f"{f.severity} {f.side} pneumothorax", noun=lambda f: "pneumothorax",
        question=("Is there a pneumothorax?", "No. There is no pneumothorax.")),
    "consolidation": FindingKind(
        "Consolidation", _draw_consolidation, grades=SEVERITIES, sided=True, zoned=True,
        negation="focal consolidation",
        sentences=lambda f: [f"{_capitalised(f.severity)} patchy consolidation in the {f.side} {f.zone} lobe.",
                             f"There is {_article(f.severity)} {f.severity} focal consolidation in the {f.side} "
                             f"{f.zone} lobe.",
                             f"{_capitalised(f.severity)} airspace consolidation in the {f.side} {f.zone} lobe."],
        impression=lambda f: f"{f.severity} {f.side} {f.zone} lobe consolidation", noun=lambda f: "consolidation",
        question=("Is there any consolidation?", "No. There is no focal consolidation.")),
    "edema": FindingKind(
        "Edema", _draw_edema, grades=DEGREES,
        sentences=lambda f: [f"There is {f.severity} pulmonary edema.", f"{_capitalised(f.severity)} pulmonary edema.",
                             f"Findings are consistent with {f.severity} pulmonary edema."],
        normal=("No pulmonary edema.", "There is no pulmonary edema."), normal_chance=0.5,
        impression=lambda f: f"{f.severity} pulmonary edema", noun=lambda f: "pulmonary edema",
        question=("Is there pulmonary edema?", "No. There is no pulmonary edema.")),
    "atelectasis": FindingKind(
        "Atelectasis", _draw_atelectasis, sided=True,
        sentences=lambda f: [f"There is {f.side} basilar atelectasis.", f"Linear atelectasis at the {f.side} lung base.",
                             f"Plate-like atelectasis in the {f.side} lower lung."],
        impression=lambda f: f"{f.side} basilar atelectasis", noun=lambda f: "atelectasis",
        question=("Is there atelectasis?", "No. There is no atelectasis.")),
    "nodule": FindingKind(
        "Lung Lesion", _draw_nodule, grades=SEVERITIES, sided=True, zoned=True,
        sentences=lambda f: [f"A {f.severity} {_lesion(f)} is seen in the {f.side} {f.zone} lung.",
                             f"There is a {f.severity} {f.side} {f.zone} lung {_lesion(f)}."],
        impression=lambda f: f"{f.severity} {f.side} {f.zone} lung {_lesion(f)}", noun=lambda f: f"lung {_lesion(f)}",
        question=("Is there a lung nodule or mass?", "No. There is no lung nodule or mass.")),
    "device": FindingKind(
        "Support Devices", _draw_device,
        sentences=lambda f: ["Endotracheal tube in place.", "An endotracheal tube is present.",
                             "Endotracheal tube terminates above the carina."]),
}


def observation(name: str) -> str:
    """The CheXpert observation a drawn finding is labelled as."""
    return KINDS[name].observation


# ---------------------------------------------------------------- reports and labels

def sample_findings(rng: np.random.Generator) -> list[Finding]:
    if rng.random() < 0.35:
        return [Finding("device")] if rng.random() < 0.1 else []
    names = list(KINDS)
    count = rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15])
    chosen = rng.choice(names, size=count, replace=False)
    return [_sample(str(n), rng) for n in sorted(chosen, key=names.index)]


def _sample(name: str, rng) -> Finding:
    kind = KINDS[name]
    side = str(rng.choice(["left", "right"])) if kind.sided else ""
    severity = str(rng.choice(kind.grades)) if kind.grades else ""
    zone = str(rng.choice(["upper", "lower"])) if kind.zoned else ""
    return Finding(name, side=side, severity=severity, zone=zone)


def _sentence(f: Finding, rng) -> str:
    return str(rng.choice(KINDS[f.name].sentences(f)))


def _negation(names: list[str], rng) -> str:
    """'No A, B or C.' in one of several phrasings a radiologist uses."""
    listed = [KINDS[n].negation for n in names]
    joined = listed[0] if len(listed) == 1 else ", ".join(listed[:-1]) + " or " + listed[-1]
    form = int(rng.integers(4))
    if form == 3:  # 'X and Y are not seen.'
        joined = listed[0] if len(listed) == 1 else ", ".join(listed[:-1]) + " and " + listed[-1]
        return f"{joined[0].upper()}{joined[1:]} {'is' if len(listed) == 1 else 'are'} not seen."
    return ("No {}.", "There is no {}.", "No evidence of {}.")[form].format(joined)


def write_report(findings: list[Finding], rng: np.random.Generator) -> tuple[str, dict]:
    """(report text, CheXpert labels): a sentence per finding, the leading kinds' (the heart's) first, then the
    absent kinds with a `negation` denied together (alphabetically), then the absent kinds' `normal` sentences."""
    present = {f.name: f for f in findings}
    labels = {obs: None for obs in CHEXPERT_OBSERVATIONS}
    sentences = [_sentence(f, rng) for f in findings if not KINDS[f.name].leads]
    for f in findings:
        labels[observation(f.name)] = 1.0
    for name in (n for n, kind in KINDS.items() if kind.leads):
        if name in present:
            sentences.insert(0, _sentence(present[name], rng))
        else:
            sentences.insert(0, str(rng.choice(KINDS[name].normal)))
            labels[observation(name)] = 0.0
    absent = sorted(n for n, kind in KINDS.items() if kind.negation and n not in present)
    if absent:
        sentences.append(_negation(absent, rng))
        for n in absent:
            labels[observation(n)] = 0.0
    for name, kind in KINDS.items():
        if kind.normal and not kind.leads and name not in present and rng.random() < kind.normal_chance:
            sentences.append(str(rng.choice(kind.normal)))
            labels[observation(name)] = 0.0
    abnormal = _abnormal(findings)
    if abnormal:
        impression = " ".join(_impression(f) for f in abnormal)
    else:
        impression = "No acute cardiopulmonary process."
        labels["No Finding"] = 1.0
    return f"FINDINGS: {' '.join(sentences)}\n\nIMPRESSION: {impression}", labels


def _abnormal(findings: list[Finding]) -> list[Finding]:
    """The findings an impression names (a support device is none)."""
    return [f for f in findings if KINDS[f.name].impression is not None]


def _impression(f: Finding) -> str:
    return _capitalised(KINDS[f.name].impression(f)) + "."


def write_conversations(findings: list[Finding], report: str, rng) -> list[list[dict]]:
    """Instruction data like the paper's: the report, a differential diagnosis and questions about findings."""
    from cxrllava_jax.domain.prompting import DIFFERENTIAL_PROMPT, REPORT_PROMPT, question_prompt

    abnormal = _abnormal(findings)
    if abnormal:
        causes = [f"{_impression(f)[:-1]}: {DIFFERENTIALS[observation(f.name)]}" for f in abnormal]
        differential = "; ".join(causes) + "."
    else:
        differential = "The chest radiograph is normal; no differential diagnosis is suggested."
    conversations = [[{"role": "user", "content": REPORT_PROMPT}, {"role": "assistant", "content": report}],
                     [{"role": "user", "content": DIFFERENTIAL_PROMPT}, {"role": "assistant", "content": differential}]]
    sided = [f for f in abnormal if f.side]
    if sided:
        f = sided[int(rng.integers(len(sided)))]
        name = KINDS[f.name].noun(f)
        conversations.append([
            {"role": "user", "content": question_prompt("Is there any abnormality on this radiograph?")},
            {"role": "assistant", "content": f"Yes. {_impression(f)}"},
            {"role": "user", "content": f"Which side is the {name} on?"},
            {"role": "assistant", "content": f"The {name} is on the {f.side} side."},
        ])
    else:
        answer = "No focal abnormality is seen." if not abnormal else f"Yes. {' '.join(_impression(f) for f in abnormal)}"
        conversations.append([
            {"role": "user", "content": question_prompt("Is there any abnormality on this radiograph?")},
            {"role": "assistant", "content": answer}])
    conversations.append(_finding_question(abnormal, rng, question_prompt))
    return conversations


def _finding_question(abnormal: list[Finding], rng, question_prompt) -> list[dict]:
    """A yes/no question about one finding (present half the time when there is one), with its size if asked."""
    present = {f.name: f for f in abnormal}
    asked = (str(rng.choice(sorted(present))) if present and rng.random() < 0.5
             else str(rng.choice(sorted(n for n, kind in KINDS.items() if kind.question))))
    question, negative = KINDS[asked].question
    turns = [{"role": "user", "content": question_prompt(question)}]
    if asked not in present:
        return turns + [{"role": "assistant", "content": negative}]
    f = present[asked]
    turns.append({"role": "assistant", "content": f"Yes. {_impression(f)}"})
    if f.severity:
        turns += [{"role": "user", "content": "How severe is it?"},
                  {"role": "assistant", "content": f"It is {f.severity}."}]
    return turns


# ---------------------------------------------------------------- the dataset on disk

# What a dataset directory holds; anything else in it is kept when it is generated anew.
DATASET_ENTRIES = ("files", "reports", "mimic-cxr-2.0.0-*.csv", "synthetic-instructions.jsonl")
STUDY_ENTRIES = ("images", "studies-*.jsonl", "single-*.jsonl")  # `write_studies`


def write_dataset(out_dir, num: int, image_size: int = 512, seed: int = 0, overwrite: bool = False) -> list[Study]:
    """Writes `num` studies in the MIMIC-CXR-JPG layout under `out_dir`; returns them. A dataset already there is
    refused, or with `overwrite` replaced whole once the new one is complete (`files.staged_directory`: never
    written into, so copies hard-linked to its images keep them)."""
    with files.staged_directory(out_dir, overwrite, owns=DATASET_ENTRIES) as staging:
        return _write_dataset(staging, num, image_size, seed)


def _write_dataset(out: Path, num: int, image_size: int, seed: int) -> list[Study]:
    rng = np.random.default_rng(seed)
    studies = []
    for i in range(num):
        subject, study = 10_000_000 + i, 50_000_000 + i
        split = _split(i, num)
        findings = sample_findings(rng)
        report, labels = write_report(findings, rng)
        s = Study(subject, study, f"{seed:04d}{i:08d}-synthetic", split, findings, report, labels)
        s.conversations = write_conversations(findings, report, rng)
        pixels = draw_radiograph(findings, image_size, rng)
        folder = out / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}"
        folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
        (folder / f"{s.dicom_id}.jpg").write_bytes(buffer.getvalue())
        report_path = out / "reports" / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}.txt"
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(f"                                 FINAL REPORT\n EXAMINATION:  CHEST (PA)\n\n"
                               f" INDICATION:  Synthetic study.\n\n {report}\n")
        studies.append(s)
    _write_tables(out, studies, image_size)
    return studies


def _split(i: int, num: int, fractions=SPLIT_FRACTIONS) -> str:
    """The split of item `i` of `num`: the first split's fraction first, then each held-out one's, in order. With at
    least one item a split, none is left empty (12 study pairs held out none at 5%, and a fine-tune on them found no
    validation file)."""
    sizes = [int(fraction * num + 0.5) for _, fraction in fractions[1:]]
    if num >= len(fractions):
        sizes = [max(1, size) for size in sizes]
    end = num
    for (name, _), size in zip(reversed(fractions[1:]), reversed(sizes)):
        end -= size
        if i >= end:
            return name
    return fractions[0][0]


def _write_tables(out: Path, studies: list[Study], size: int):
    with open(out / "mimic-cxr-2.0.0-metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
                    "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                    "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"])
        for s in studies:
            w.writerow([s.dicom_id, s.subject_id, s.study_id, "CHEST (PA AND LAT)", "PA", size, size, 21800101,
                        "120000.000", "CHEST (PA AND LAT)", "postero-anterior", "Erect"])
    with open(out / "mimic-cxr-2.0.0-chexpert.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["subject_id", "study_id", *CHEXPERT_OBSERVATIONS])
        for s in studies:
            w.writerow([s.subject_id, s.study_id, *("" if s.labels[o] is None else s.labels[o]
                                                     for o in CHEXPERT_OBSERVATIONS)])
    with open(out / "mimic-cxr-2.0.0-split.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dicom_id", "study_id", "subject_id", "split"])
        for s in studies:
            w.writerow([s.dicom_id, s.study_id, s.subject_id, s.split])
    with open(out / "synthetic-instructions.jsonl", "w") as f:
        for s in studies:
            f.write(json.dumps({"study_id": s.study_id, "conversations": s.conversations}) + "\n")


# ---------------------------------------------------------------- studies: a prior and a current study

CHANGES = ("new", "resolved", "increased", "decreased", "unchanged")


@dataclasses.dataclass
class StudyPair:
    """A patient's prior study and current study, and how each finding changed between them."""

    index: int
    split: str
    prior: list[Finding]
    current: list[Finding]
    changes: dict[str, str]  # finding name -> one of CHANGES
    prior_report: str = ""
    report: str = ""


def evolve(prior: list[Finding], rng: np.random.Generator) -> tuple[list[Finding], dict[str, str]]:
    """The current findings grown from the prior ones, and each finding's change: every prior finding stays,
    resolves, or (graded kinds) moves one grade up or down; a kind absent before appears half the time."""
    current, changes = [], {}
    for f in prior:
        grades = KINDS[f.name].grades
        options = ["unchanged", "resolved"] + (["increased"] if grades and f.severity != grades[-1] else []) \
            + (["decreased"] if grades and f.severity != grades[0] else [])
        change = str(rng.choice(options))
        changes[f.name] = change
        if change != "resolved":
            step = {"increased": 1, "decreased": -1}.get(change, 0)
            severity = grades[grades.index(f.severity) + step] if grades else f.severity
            current.append(dataclasses.replace(f, severity=severity))
    absent = [n for n, kind in KINDS.items() if kind.impression is not None and n not in changes]
    if absent and (rng.random() < 0.5 or not prior):
        name = str(rng.choice(absent))
        current.append(_sample(name, rng))
        changes[name] = "new"
    order = list(KINDS)
    return sorted(current, key=lambda f: order.index(f.name)), changes


def comparison_sentence(name: str, change: str, prior: dict[str, Finding], current: dict[str, Finding]) -> str:
    """The report's sentence for one finding's change since the prior study. A finding still there is described as
    the current films show it, then as the prior report gave it, then judged ("Moderate right pleural effusion,
    previously small: increased."): the verdict follows the prior grade it compares with. (With the verdict first,
    or a word between the prior grade and the verdict, the demo's 2-layer model judged increased and decreased
    little better than chance: its verdict then needs a grade further back.)"""
    if change == "resolved":
        return f"The previously seen {KINDS[name].impression(prior[name])} has resolved."
    phrase = _capitalised(KINDS[name].impression(current[name]))
    if change == "new":
        return f"{phrase}, not seen previously: new."
    return f"{phrase}, previously {prior[name].severity or 'present'}: {change}."


def write_comparison_report(pair: StudyPair, rng: np.random.Generator) -> str:
    """FINDINGS: a change sentence per finding (in KINDS order) and the absent kinds denied; IMPRESSION: the
    changes, or no change at all."""
    prior = {f.name: f for f in pair.prior}
    current = {f.name: f for f in pair.current}
    names = [n for n in KINDS if n in pair.changes]
    sentences = [comparison_sentence(n, pair.changes[n], prior, current) for n in names]
    absent = sorted(n for n, kind in KINDS.items() if kind.negation and n not in current and n not in pair.changes)
    findings = " ".join(sentences + ([_negation(absent, rng)] if absent else []))
    changed = [s for n, s in zip(names, sentences) if pair.changes[n] != "unchanged"]
    impression = " ".join(changed) if changed else "No interval change."
    return f"FINDINGS: {findings}\n\nIMPRESSION: {impression}"


def draw_lateral(findings: list[Finding], size: int, rng: np.random.Generator) -> np.ndarray:
    """A lateral chest radiograph as uint8 [size, size]: the heart in front (image left), the spine behind, one
    lung field; effusions fill the posterior base, other findings show as densities at their height."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    body = _ellipse(x, y, 0.5, 0.55, 0.4, 0.52)
    lung = _ellipse(x, y, 0.52 + rng.normal(0, 0.01), 0.48, 0.26, 0.32) * (y < 0.8)
    img = 0.15 + 0.05 * rng.random() + 0.35 * body - 0.3 * lung
    enlarged = {f.name: f.severity for f in findings}.get("cardiomegaly")
    heart_width = {None: 0.11, "mild": 0.145, "moderate": 0.18, "severe": 0.215}[enlarged]
    img = img + 0.4 * _ellipse(x, y, 0.36, 0.62, heart_width, 0.15) + 0.45 * (np.abs(x - 0.8) < 0.04) * body
    for f in findings:
        if f.name == "effusion":
            img = img + 0.45 * lung * (y > 0.78 - 0.1 * _scale(f)) * (x > 0.5)
        elif KINDS[f.name].draw is not None:
            cy = 0.38 if f.zone == "upper" else 0.6
            img = img + 0.35 * lung * (_blob(x, y, 0.55, cy, 0.05 * _scale(f)) > 0.4)
    img = img + rng.normal(0, 0.025, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def write_studies(out_dir, num: int, image_size: int = 512, seed: int = 0,
                  overwrite: bool = False) -> list[StudyPair]:
    """Writes `num` prior/current study pairs as LLaVA conversation files under `out_dir`; returns them. Pairs
    already there are refused, or with `overwrite` replaced whole once the new ones are complete (as
    `write_dataset`)."""
    with files.staged_directory(out_dir, overwrite, owns=STUDY_ENTRIES) as staging:
        return _write_studies(staging, num, image_size, seed)


def _write_studies(out: Path, num: int, image_size: int, seed: int) -> list[StudyPair]:
    from cxrllava_jax.domain.prompting import COMPARISON_QUESTION, REPORT_PROMPT, study_prompt

    (out / "images").mkdir()
    rng = np.random.default_rng(seed)
    pairs, lines = [], {}
    for i in range(num):
        prior = [f for f in sample_findings(rng) if KINDS[f.name].impression is not None]
        current, changes = evolve(prior, rng)
        pair = StudyPair(i, _split(i, num, STUDY_SPLIT_FRACTIONS), prior, current, changes)
        pair.prior_report, _ = write_report(prior, rng)
        pair.report = write_comparison_report(pair, rng)
        names = {}
        for view, pixels in (("current_pa", draw_radiograph(current, image_size, rng)),
                             ("current_lateral", draw_lateral(current, image_size, rng)),
                             ("prior_pa", draw_radiograph(prior, image_size, rng))):
            names[view] = f"images/{seed:04d}-{i:06d}-{view}.png"
            Image.fromarray(pixels).save(out / names[view])
        prompt = study_prompt(COMPARISON_QUESTION, ["PA", "LATERAL"], ["PA"], "21791201", pair.prior_report,
                              date="21800101")
        answer = {"from": "gpt", "value": pair.report}
        common = {"id": f"{seed:04d}-{i:06d}", "report": pair.report, "changes": changes}
        lines.setdefault(pair.split, {"studies": [], "single": []})
        lines[pair.split]["studies"].append({**common, "conversations": [{"from": "human", "value": prompt}, answer],
                                             "image": [names["current_pa"], names["current_lateral"],
                                                       names["prior_pa"]]})
        lines[pair.split]["single"].append({**common, "image": names["current_pa"],
                                            "conversations": [{"from": "human", "value": REPORT_PROMPT}, answer]})
        pairs.append(pair)
    for split, kinds in lines.items():
        for kind, records in kinds.items():
            (out / f"{kind}-{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return pairs


def main(argv) -> int:
    parser = arguments.parser("cxrllava synth", __doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=arguments.output_dir, help="output directory (MIMIC-CXR-JPG layout)")
    parser.add_argument("--num", type=arguments.whole_number(1, MAX_STUDIES), default=1000, help="number of studies")
    parser.add_argument("--image-size", type=arguments.whole_number(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE), default=512,
                        help="width and height of the images in pixels")
    parser.add_argument("--seed", type=arguments.whole_number(0, 2**32 - 1), default=0,
                        help="the same seed gives the same bytes")
    parser.add_argument("--studies", action="store_true",
                        help="write prior/current study pairs (frontal, lateral, prior) as LLaVA conversation files")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a dataset already in --out (the new one is built beside it and swapped in)")
    args = parser.parse_args(argv)
    if args.studies:
        pairs = write_studies(args.out, args.num, args.image_size, args.seed, overwrite=args.overwrite)
        counts = {split: sum(p.split == split for p in pairs) for split, _ in STUDY_SPLIT_FRACTIONS}
        print(f"wrote {len(pairs)} synthetic prior/current studies to {args.out} ({counts})")
        return 0
    studies = write_dataset(args.out, args.num, args.image_size, args.seed, overwrite=args.overwrite)
    counts = {split: sum(s.split == split for s in studies) for split, _ in SPLIT_FRACTIONS}
    print(f"wrote {len(studies)} synthetic studies to {args.out} ({counts})")
    return 0
