"""The record schema's rules and the stage views: label vectors from a source's findings, stage 1A's
normal/abnormal target, stage 1B's keyword texts, stage 2's instruction conversations, patient splits."""

import math

import numpy as np
import pytest

from cxrllava_jax.domain.findings import CHEXPERT_OBSERVATIONS
from cxrllava_jax.domain import prompting
from input_pipeline import instructions
from cxrllava_jax.errors import InputError
from input_pipeline.records import Record, hashed_split, is_abnormal, keyword_text, labels_from, mapped_labels

OBS = {name: i for i, name in enumerate(CHEXPERT_OBSERVATIONS)}


def labels(**values) -> np.ndarray:
    out = np.full(14, np.nan, np.float32)
    for name, value in values.items():
        out[OBS[name.replace("_", " ")]] = value
    return out


def test_labels_from_accepts_the_chexpert_spellings_and_names_bad_values():
    row = {"Cardiomegaly": "1.0", "Edema": "-1", "Pleural Effusion": "0", "Fracture": "", "Atelectasis": " 1 "}
    np.testing.assert_array_equal(labels_from(row, "x"), labels(Cardiomegaly=1, Edema=-1, Pleural_Effusion=0,
                                                                Atelectasis=1))
    for bad in ("2", "yes", "0.5"):
        with pytest.raises(InputError, match=f"valid.csv line 7: Edema has value '{bad}'"):
            labels_from({"Edema": bad}, "valid.csv line 7")


def test_mapped_labels_grade_only_what_the_source_grades():
    got = mapped_labels([("Consolidation", 1.0), ("Pleural Effusion", -1.0), ("Pleural Effusion", 1.0)],
                        graded=["Consolidation", "Lung Opacity", "Pleural Effusion", "Cardiomegaly"], normal=False)
    np.testing.assert_array_equal(got, labels(No_Finding=0, Consolidation=1, Lung_Opacity=1, Pleural_Effusion=1,
                                              Cardiomegaly=0))
    uncertain_child = mapped_labels([("Atelectasis", -1.0)], ["Atelectasis", "Lung Opacity"], normal=None)
    assert uncertain_child[OBS["Lung Opacity"]] == -1 and math.isnan(uncertain_child[OBS["No Finding"]])
    assert mapped_labels([], ["Edema"], normal=True)[OBS["No Finding"]] == 1


@pytest.mark.parametrize("values,policy,expected", [
    ({"Cardiomegaly": 1}, "abnormal", True),
    ({"No Finding": 1, "Support Devices": 1}, "abnormal", False),
    ({"No Finding": 0, "Cardiomegaly": 0}, "exclude", True),  # an abnormality outside the 14 observations
    ({"Edema": -1, "Cardiomegaly": 0}, "abnormal", True),
    ({"Edema": -1, "Cardiomegaly": 0}, "normal", False),
    ({"Edema": -1, "Cardiomegaly": 0}, "exclude", None),
    ({"Edema": -1, "Pneumonia": 1}, "exclude", True),
    ({"Pleural Effusion": 0}, "abnormal", False),
    ({"Support Devices": 1}, "abnormal", None),
    ({}, "abnormal", None),
])
def test_stage_1a_target(values, policy, expected):
    assert is_abnormal(labels(**{k.replace(" ", "_"): v for k, v in values.items()}), policy) is expected


def test_stage_1a_policy_is_checked():
    with pytest.raises(ValueError, match="uncertain_policy"):
        is_abnormal(labels(Edema=1), "maybe")


def test_stage_1b_keyword_text():
    assert keyword_text(labels(Cardiomegaly=1, Pleural_Effusion=1, Edema=-1, No_Finding=0)) == \
        "cardiomegaly, pleural effusion"
    assert keyword_text(labels(No_Finding=1, Edema=0)) == "no finding"
    assert keyword_text(labels(No_Finding=0), findings=("COPD signs", "hiatal hernia", "COPD signs")) == \
        "copd signs, hiatal hernia"
    assert keyword_text(labels(Edema=-1)) == ""  # nothing certain to say: the view leaves the record out


def test_hashed_split_is_stable_and_about_one_in_nine():
    splits = [hashed_split(f"nih/{i}") for i in range(9000)]
    assert splits == [hashed_split(f"nih/{i}") for i in range(9000)]
    assert 0.095 < splits.count("validate") / len(splits) < 0.128
    assert hashed_split("nih/1", validate_fraction=0.0) == "train"


REPORT = ("FINDINGS: The heart is enlarged. There is a small left pleural effusion with adjacent atelectasis at the "
          "left base. No pneumothorax is seen.\n\nIMPRESSION: Cardiomegaly and small left effusion.")


def record(report=REPORT, **values) -> Record:
    return Record(image="x.jpg", labels=labels(**values), report=report, dataset="mimic", split="train", view="PA")


def test_stage_2_conversations_from_a_report():
    report_turns, differential, questions = instructions.conversations(record())
    assert report_turns == [{"role": "user", "content": prompting.REPORT_PROMPT},
                            {"role": "assistant", "content": REPORT}]
    assert differential[0]["content"] == prompting.DIFFERENTIAL_PROMPT
    for finding in ("cardiomegaly", "pleural effusion", "atelectasis"):
        assert f"The {finding} may be due to" in differential[1]["content"]
    asked = {turn["content"]: answer["content"] for turn, answer in zip(questions[::2], questions[1::2])}
    assert asked[prompting.question_prompt("Is there any cardiomegaly?")] == \
        "Yes. The heart is enlarged. Cardiomegaly and small left effusion."
    assert asked["Where is the pleural effusion located?"] == (
        "There is a small left pleural effusion with adjacent atelectasis at the left base. Cardiomegaly and small "
        "left effusion.")
    assert asked["Is there any pneumothorax?"] == "No, there is no pneumothorax on this radiograph."
    for conversation in (report_turns, differential, questions):
        prompting.chat_text(conversation)  # valid turns: alternating roles, <image> only in the first


def test_stage_2_uses_the_record_labels_first():
    # The source says cardiomegaly is absent although the report text would read positive: the source wins.
    _, differential, questions = instructions.conversations(record(Cardiomegaly=0, Pleural_Effusion=1))
    assert "cardiomegaly" not in differential[1]["content"]
    assert not any("cardiomegaly" in t["content"] for t in questions[::2])
    normal = record("FINDINGS: The lungs are clear. No pleural effusion or pneumothorax. Heart size is normal.")
    _, differential, questions = instructions.conversations(normal)
    assert differential[1]["content"] == instructions.NORMAL_DIFFERENTIAL
    assert questions[0]["content"] == prompting.question_prompt("Is there any pneumothorax?")
    assert instructions.conversations(record(report="")) == []
