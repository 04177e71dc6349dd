"""Reading labels out of the model's answer to the label-generation prompt."""

import math

import pytest

from cxrllava_jax.evaluation.json_labels import parse_json_labels
from cxrllava_jax.domain.findings import NEGATIVE, POSITIVE, UNCERTAIN


def _given(parsed):
    return {k: v for k, v in parsed.labels.items() if not math.isnan(v)}


def test_valid_json():
    parsed = parse_json_labels('{"Cardiomegaly": 1, "Edema": 0, "Pleural Effusion": -1, "Fracture": null}')
    assert parsed.parsed and parsed.unknown == []
    assert _given(parsed) == {"Cardiomegaly": POSITIVE, "Edema": NEGATIVE, "Pleural Effusion": UNCERTAIN}
    assert len(parsed.as_row()) == 14


def test_chatty_fenced_answer_with_loose_names_and_values():
    text = (
        "Sure! Based on the radiograph, here are the labels:\n```json\n"
        "{'cardiomegaly': 'Yes', 'pleural_effusion': 'negative', 'PneumoThorax': False, 'support devices': true,}\n"
        "```\nPlease consult a radiologist."
    )
    assert _given(parse_json_labels(text)) == {
        "Cardiomegaly": POSITIVE, "Pleural Effusion": NEGATIVE, "Pneumothorax": NEGATIVE, "Support Devices": POSITIVE,
    }


@pytest.mark.parametrize("cut", ['"Pneumo', '"Pneumothorax": ', '"Pneumothorax": "pos', ""])
def test_truncated_answer_keeps_the_complete_members(cut):
    parsed = parse_json_labels('{"Atelectasis": 1, "Lung Opacity": "present", ' + cut)
    assert parsed.parsed
    assert _given(parsed) == {"Atelectasis": POSITIVE, "Lung Opacity": POSITIVE}


def test_nested_lists_and_plain_lines():
    assert _given(parse_json_labels('{"labels": {"Consolidation": 1}}')) == {"Consolidation": POSITIVE}
    assert _given(parse_json_labels('Findings: ["Edema", "Cardiomegaly"]')) == {"Edema": POSITIVE,
                                                                               "Cardiomegaly": POSITIVE}
    assert _given(parse_json_labels("Pneumonia: no\nAtelectasis: yes")) == {"Pneumonia": NEGATIVE,
                                                                            "Atelectasis": POSITIVE}


def test_what_cannot_be_parsed_is_reported():
    refusal = parse_json_labels("I'm sorry, I cannot interpret medical images.")
    assert not refusal.parsed and all(math.isnan(v) for v in refusal.labels.values())
    odd = parse_json_labels('{"Cardiomegaly": 1, "Aortic Knob": 1, "Edema": 7}')
    assert odd.parsed and sorted(odd.unknown) == ["Aortic Knob: 1", "Edema: 7"]
