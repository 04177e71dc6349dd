"""Stage 2 instruction data for sources with reports (MIMIC, Indiana), built offline by rules.

The paper had GPT-4 turn each refined report into a report, a differential diagnosis and question-answer turns
about the location, number or presence of findings (supplement). Here the same three kinds of conversation come
from the report and its labels: the report itself; a differential diagnosis assembled from a fixed list per
positive observation; and a multi-turn conversation that asks where each positive finding is (answered with the
report's own sentence about it) and whether a major finding the report rules out is present.
A record's labels are used where given; observations it leaves NaN are read from the report by our labeler.
"""

import re

import numpy as np

from cxrllava_jax.domain.labeler import SENTENCE_END, label_report
from cxrllava_jax.domain.findings import CHEXPERT_OBSERVATIONS, DIFFERENTIALS, NEGATIVE, POSITIVE
from cxrllava_jax.domain.prompting import DIFFERENTIAL_PROMPT, REPORT_PROMPT, question_prompt
from input_pipeline.records import Record

# How each observation is named in a question or answer.
NAMES = {
    "Enlarged Cardiomediastinum": "enlarged cardiomediastinal silhouette",
    "Cardiomegaly": "cardiomegaly",
    "Lung Lesion": "lung nodule or mass",
    "Lung Opacity": "lung opacity",
    "Edema": "pulmonary edema",
    "Consolidation": "consolidation",
    "Pneumonia": "pneumonia",
    "Atelectasis": "atelectasis",
    "Pneumothorax": "pneumothorax",
    "Pleural Effusion": "pleural effusion",
    "Pleural Other": "pleural thickening",
    "Fracture": "fracture",
}
NORMAL_DIFFERENTIAL = ("No acute cardiopulmonary abnormality is seen on this radiograph, so it does not suggest a "
                       "differential diagnosis. If symptoms persist, clinical correlation or further imaging may "
                       "be considered.")
# Findings with a place in the chest to ask about; the others (heart size, mediastinum) are asked yes/no.
LOCALIZED = {"Lung Lesion", "Lung Opacity", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax",
             "Pleural Effusion", "Pleural Other", "Fracture"}
# Findings asked about when the report rules them out, in this order of preference.
MAJOR_FINDINGS = ("Pneumothorax", "Pleural Effusion", "Consolidation", "Cardiomegaly", "Edema")
_SECTION = re.compile(r"^(?:FINDINGS|IMPRESSION)\s*:\s*")


def conversations(record: Record) -> list[list[dict]]:
    """The record's instruction conversations ([] without a report); the first user turn carries <image>."""
    if not record.report.strip():
        return []
    labels = _labels(record)
    positive = [o for o in NAMES if labels[o] == POSITIVE]
    turns = [[_user(REPORT_PROMPT), _assistant(record.report)],
             [_user(DIFFERENTIAL_PROMPT), _assistant(differential_diagnosis(positive))]]
    questions = _questions(record.report, positive, labels)
    if questions:
        qa = []
        for i, (question, answer) in enumerate(questions):
            qa += [_user(question_prompt(question) if i == 0 else question), _assistant(answer)]
        turns.append(qa)
    return turns


def differential_diagnosis(positive: list[str]) -> str:
    if not positive:
        return NORMAL_DIFFERENTIAL
    lines = [f"The {NAMES[o]} may be due to {DIFFERENTIALS[o]}." for o in positive]
    return " ".join(lines) + " Correlation with the clinical history is needed to narrow these possibilities."


def _labels(record: Record) -> dict:
    from_report = label_report(record.report)
    return {o: float(v) if not np.isnan(v) else from_report[o] for o, v in zip(CHEXPERT_OBSERVATIONS, record.labels)}


def _questions(report: str, positive: list[str], labels: dict) -> list[tuple[str, str]]:
    sentences = [_SECTION.sub("", s.strip()) for s in SENTENCE_END.split(report) if s.strip()]
    questions = []
    for observation in positive:
        evidence = [s for s in sentences if label_report(s)[observation] == POSITIVE]
        if not evidence:
            continue
        if observation in LOCALIZED:
            questions.append((f"Where is the {NAMES[observation]} located?", " ".join(evidence)))
        else:
            questions.append((f"Is there any {NAMES[observation]}?", "Yes. " + " ".join(evidence)))
    ruled_out = next((o for o in MAJOR_FINDINGS if labels[o] == NEGATIVE), None)
    if ruled_out:
        questions.append((f"Is there any {NAMES[ruled_out]}?", f"No, there is no {NAMES[ruled_out]} on this "
                                                                 "radiograph."))
    return questions


def _user(content: str) -> dict:
    return {"role": "user", "content": content}


def _assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}
