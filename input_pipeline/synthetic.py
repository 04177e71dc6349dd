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
"""

import argparse
import csv
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from cxrllava_jax import files
from cxrllava_jax.domain.findings import CHEXPERT_OBSERVATIONS, DIFFERENTIALS

FINDINGS = ("effusion", "cardiomegaly", "pneumothorax", "consolidation", "edema", "atelectasis", "nodule", "device")
# Which CheXpert observation each drawn finding is labelled as.
OBSERVATION = {"effusion": "Pleural Effusion", "cardiomegaly": "Cardiomegaly", "pneumothorax": "Pneumothorax",
               "consolidation": "Consolidation", "edema": "Edema", "atelectasis": "Atelectasis",
               "nodule": "Lung Lesion", "device": "Support Devices"}
SEVERITIES = ("small", "moderate", "large")  # size of an effusion, pneumothorax, consolidation or nodule
DEGREES = ("mild", "moderate", "severe")  # degree of cardiomegaly or edema
SIDED = ("effusion", "pneumothorax", "consolidation", "atelectasis", "nodule")
SPLIT_FRACTIONS = (("train", 0.8), ("validate", 0.1), ("test", 0.1))


@dataclasses.dataclass(frozen=True)
class Finding:
    name: str
    side: str = ""  # 'left' / 'right' / '' (bilateral or central)
    severity: str = ""  # one of SEVERITIES, or of DEGREES for cardiomegaly and edema
    zone: str = ""  # 'upper' / 'lower'


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
    heart_width = {None: 0.12, "mild": 0.17, "moderate": 0.2, "severe": 0.23}[enlarged]
    heart = _ellipse(x, y, 0.53, 0.62, heart_width + rng.normal(0, 0.008), 0.14)
    img = img + 0.4 * heart + 0.3 * _ellipse(x, y, 0.5, 0.35, 0.05, 0.2)  # heart and mediastinum
    img = img + 0.4 * (y > 0.78 + 0.05 * np.abs(x - 0.5)) * body  # diaphragm and abdomen
    for f in findings:
        if f.name != "cardiomegaly":  # drawn above as the wider heart
            img = _draw_finding(img, f, x, y, lungs, rng)
    img = img + rng.normal(0, 0.025, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _ellipse(x, y, cx, cy, rx, ry):
    return (((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0).astype(np.float32)


def _blob(x, y, cx, cy, r):
    return np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))


def _draw_finding(img, f: Finding, x, y, lungs, rng):
    cx = 0.31 if f.side == "right" else 0.69
    lung = lungs.get(f.side, lungs["right"] + lungs["left"])
    scale = {"small": 0.7, "moderate": 1.0, "large": 1.3}.get(f.severity, 1.0)
    if f.name == "effusion":  # fluid fills the lung base with a meniscus
        level = 0.78 - 0.12 * scale + 0.04 * np.abs(x - cx) / 0.15
        return img + 0.45 * lung * (y > level)
    if f.name == "pneumothorax":  # a lucent rim along the apex and lateral wall, no lung markings
        rim = lung * (_ellipse(x, y, cx, 0.5, 0.15, 0.3) - _ellipse(x, y, cx + (0.04 if f.side == "right" else -0.04),
                                                                    0.55, 0.15 - 0.05 * scale, 0.3 - 0.07 * scale))
        return img - 0.3 * np.clip(rim, 0, 1)
    if f.name == "consolidation":
        cy = 0.4 if f.zone == "upper" else 0.62
        return img + 0.45 * lung * (_blob(x, y, cx, cy, 0.06 * scale) > 0.35)
    if f.name == "edema":  # bilateral perihilar haze
        density = {"mild": 0.22, "moderate": 0.3, "severe": 0.4}.get(f.severity, 0.3)
        return img + density * lung * (_blob(x, y, 0.36, 0.5, 0.09) + _blob(x, y, 0.64, 0.5, 0.09))
    if f.name == "atelectasis":  # a horizontal band at the base
        band = np.exp(-((y - 0.68 + 0.1 * (x - cx)) ** 2) / (2 * 0.012 ** 2))
        return img + 0.5 * lung * band * (np.abs(x - cx) < 0.12)
    if f.name == "nodule":  # a large one is a mass
        cy = 0.38 if f.zone == "upper" else 0.6
        radius = {"small": 0.018, "moderate": 0.025, "large": 0.045}.get(f.severity, 0.025)
        return img + 0.55 * (_blob(x, y, cx + rng.normal(0, 0.02), cy, radius) > 0.5)
    if f.name == "device":  # an endotracheal tube down the midline
        return img + 0.5 * ((np.abs(x - 0.5) < 0.012) & (y < 0.38)).astype(np.float32)
    raise ValueError(f"unknown finding {f.name!r}")


# ---------------------------------------------------------------- reports and labels

def sample_findings(rng: np.random.Generator) -> list[Finding]:
    if rng.random() < 0.35:
        return [Finding("device")] if rng.random() < 0.1 else []
    count = rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15])
    names = rng.choice(FINDINGS, size=count, replace=False)
    return [Finding(str(n), side=str(rng.choice(["left", "right"])) if n in SIDED else "",
                    severity=_draw_severity(str(n), rng),
                    zone=str(rng.choice(["upper", "lower"])) if n in ("consolidation", "nodule") else "")
            for n in sorted(names, key=FINDINGS.index)]


def _draw_severity(name: str, rng) -> str:
    if name in ("cardiomegaly", "edema"):
        return str(rng.choice(DEGREES))
    if name in ("effusion", "pneumothorax", "nodule", "consolidation"):
        return str(rng.choice(SEVERITIES))
    return ""


def _lesion(f: Finding) -> str:
    return "mass" if f.severity == "large" else "nodule"


def _sentence(f: Finding, rng) -> str:
    side, sev, zone, lesion = f.side, f.severity, f.zone, _lesion(f)
    options = {
        "effusion": [f"There is a {sev} {side} pleural effusion.", f"{sev.capitalize()} {side} pleural effusion.",
                     f"A {sev} {side} pleural effusion is present."],
        "cardiomegaly": {"mild": ["The heart is mildly enlarged.", "Mild cardiomegaly."],
                         "moderate": ["There is moderate cardiomegaly.", "The heart is moderately enlarged."],
                         "severe": ["Severe cardiomegaly.", "The heart is markedly enlarged."],
                         }.get(sev, ["Cardiomegaly."]),
        "pneumothorax": [f"There is a {sev} {side} pneumothorax.", f"{sev.capitalize()} {side} apical pneumothorax.",
                         f"A {sev} {side} pneumothorax is seen."],
        "consolidation": [f"Patchy consolidation in the {side} {zone} lobe.",
                          f"There is focal consolidation in the {side} {zone} lobe.",
                          f"Airspace consolidation in the {side} {zone} lobe."],
        "edema": [f"There is {sev} pulmonary edema.", f"{sev.capitalize()} pulmonary edema.",
                  f"Findings are consistent with {sev} pulmonary edema."],
        "atelectasis": [f"There is {side} basilar atelectasis.", f"Linear atelectasis at the {side} lung base.",
                        f"Plate-like atelectasis in the {side} lower lung."],
        "nodule": [f"A {sev} {lesion} is seen in the {side} {zone} lung.",
                   f"There is a {sev} {side} {zone} lung {lesion}."],
        "device": ["Endotracheal tube in place.", "An endotracheal tube is present.",
                   "Endotracheal tube terminates above the carina."],
    }[f.name]
    return str(rng.choice(options))


NEGATED = {"consolidation": "focal consolidation", "effusion": "pleural effusion", "pneumothorax": "pneumothorax"}


def _negation(names: list[str], rng) -> str:
    """'No A, B or C.' in one of several phrasings a radiologist uses."""
    listed = [NEGATED[n] for n in names]
    joined = listed[0] if len(listed) == 1 else ", ".join(listed[:-1]) + " or " + listed[-1]
    form = int(rng.integers(4))
    if form == 3:  # 'X and Y are not seen.'
        joined = listed[0] if len(listed) == 1 else ", ".join(listed[:-1]) + " and " + listed[-1]
        return f"{joined[0].upper()}{joined[1:]} {'is' if len(listed) == 1 else 'are'} not seen."
    return ("No {}.", "There is no {}.", "No evidence of {}.")[form].format(joined)


def write_report(findings: list[Finding], rng: np.random.Generator) -> tuple[str, dict]:
    """(report text, CheXpert labels) with explicit negations of the main findings not present."""
    names = {f.name for f in findings}
    labels = {obs: None for obs in CHEXPERT_OBSERVATIONS}
    sentences = [_sentence(f, rng) for f in findings if f.name != "cardiomegaly"]
    for f in findings:
        labels[OBSERVATION[f.name]] = 1.0
    if "cardiomegaly" in names:
        sentences.insert(0, _sentence(next(f for f in findings if f.name == "cardiomegaly"), rng))
    else:
        sentences.insert(0, str(rng.choice(["Heart size is normal.", "The cardiac silhouette is normal in size.",
                                            "Heart size is within normal limits."])))
        labels["Cardiomegaly"] = 0.0
    absent = [n for n in NEGATED if n not in names]
    if absent:
        sentences.append(_negation(absent, rng))
        for n in absent:
            labels[OBSERVATION[n]] = 0.0
    if "edema" not in names and rng.random() < 0.5:
        sentences.append(str(rng.choice(["No pulmonary edema.", "There is no pulmonary edema."])))
        labels["Edema"] = 0.0
    abnormal = [f for f in findings if f.name != "device"]
    if abnormal:
        impression = " ".join(_impression(f) for f in abnormal)
    else:
        impression = "No acute cardiopulmonary process."
        labels["No Finding"] = 1.0
    return f"FINDINGS: {' '.join(sentences)}\n\nIMPRESSION: {impression}", labels


def _impression(f: Finding) -> str:
    text = {"effusion": f"{f.severity} {f.side} pleural effusion", "cardiomegaly": f"{f.severity} cardiomegaly",
            "pneumothorax": f"{f.severity} {f.side} pneumothorax", "consolidation": f"{f.side} {f.zone} lobe consolidation",
            "edema": f"{f.severity} pulmonary edema", "atelectasis": f"{f.side} basilar atelectasis",
            "nodule": f"{f.side} {f.zone} lung {_lesion(f)}"}[f.name]
    return text[0].upper() + text[1:] + "."


# Yes/no questions about one finding, and the answer when it is absent.
QUESTIONS = {
    "effusion": ("Is there a pleural effusion?", "No. There is no pleural effusion."),
    "cardiomegaly": ("Is the heart enlarged?", "No. The heart size is normal."),
    "pneumothorax": ("Is there a pneumothorax?", "No. There is no pneumothorax."),
    "consolidation": ("Is there any consolidation?", "No. There is no focal consolidation."),
    "edema": ("Is there pulmonary edema?", "No. There is no pulmonary edema."),
    "atelectasis": ("Is there atelectasis?", "No. There is no atelectasis."),
    "nodule": ("Is there a lung nodule or mass?", "No. There is no lung nodule or mass."),
}


def write_conversations(findings: list[Finding], report: str, rng) -> list[list[dict]]:
    """Instruction data like the paper's: the report, a differential diagnosis and questions about findings."""
    from cxrllava_jax.domain.prompting import DIFFERENTIAL_PROMPT, REPORT_PROMPT, question_prompt

    abnormal = [f for f in findings if f.name != "device"]
    if abnormal:
        causes = [f"{_impression(f)[:-1]}: {DIFFERENTIALS[OBSERVATION[f.name]]}" for f in abnormal]
        differential = "; ".join(causes) + "."
    else:
        differential = "The chest radiograph is normal; no differential diagnosis is suggested."
    conversations = [[{"role": "user", "content": REPORT_PROMPT}, {"role": "assistant", "content": report}],
                     [{"role": "user", "content": DIFFERENTIAL_PROMPT}, {"role": "assistant", "content": differential}]]
    sided = [f for f in abnormal if f.side]
    if sided:
        f = sided[int(rng.integers(len(sided)))]
        name = f"lung {_lesion(f)}" if f.name == "nodule" else NEGATED.get(f.name, f.name).removeprefix("focal ")
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
             else str(rng.choice(sorted(QUESTIONS))))
    question, negative = QUESTIONS[asked]
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


def generate(out_dir, num: int, image_size: int = 512, seed: int = 0, overwrite: bool = False) -> list[Study]:
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


def _split(i: int, num: int) -> str:
    position = (i + 0.5) / num
    edge = 0.0
    for name, fraction in SPLIT_FRACTIONS:
        edge += fraction
        if position < edge:
            return name
    return SPLIT_FRACTIONS[-1][0]


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


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="cxrllava synth", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory (MIMIC-CXR-JPG layout)")
    parser.add_argument("--num", type=int, default=1000, help="number of studies")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a dataset already in --out (the new one is built beside it and swapped in)")
    args = parser.parse_args(argv)
    studies = generate(args.out, args.num, args.image_size, args.seed, overwrite=args.overwrite)
    counts = {split: sum(s.split == split for s in studies) for split, _ in SPLIT_FRACTIONS}
    print(f"wrote {len(studies)} synthetic studies to {args.out} ({counts})")
    return 0
