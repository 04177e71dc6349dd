"""Model cards in the Hub's format: huggingface_hub's own parser reads back what we write, for a trained model with
its evaluation, a PEFT adapter naming its base, and a card that an evaluation updates."""

import pytest
from huggingface_hub import ModelCard

from cxrllava_jax.convert import model_card
from cxrllava_jax.evaluation.run import card_evaluation

TRAINED = {"format": "cxrllava-jax", "model_kind": "cxr_llava", "base_model": "ECOFRI/CXR-LLAVA-v2",
           "base_source": "config.init.release=/cache/models--ECOFRI--CXR-LLAVA-v2/snapshots/abc",
           "training": {"task": "finetune", "steps": 120, "config": {"optim.learning_rate": 0.0002, "lora.rank": 16}},
           "datasets": ["mimic"], "evaluations": []}
RESULTS = {"dataset": "mimic", "split": "test", "text_metrics": {"bleu_4": 0.0912, "rouge_l": 0.2754},
           "result": {"averages": {"F1-14": {"micro": {"f1": 0.61234}, "macro": {"f1": 0.4}},
                                   "F1-5": {"micro": {"f1": 0.7}, "macro": {"f1": 0.65}}}}}


def test_a_trained_model_s_card_and_its_evaluation(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    model_card.write(model, TRAINED)
    card = ModelCard.load(model / "README.md")
    assert (card.data.license, card.data.base_model, card.data.library_name, card.data.datasets) == (
        "other", "ECOFRI/CXR-LLAVA-v2", "cxrllava-jax", ["mimic"])
    assert {"medical", "radiology", "chest-x-ray"} <= set(card.data.tags)
    assert "Task `finetune` of `train.py`, 120 steps" in card.text and "For research only" in card.text
    assert card.data.eval_results is None and "Not evaluated yet" in card.text

    assert model_card.add_evaluation(model, card_evaluation(RESULTS))
    assert model_card.add_evaluation(model, card_evaluation(RESULTS))  # the same set again replaces, not repeats
    card = ModelCard.load(model / "README.md")
    scores = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert scores == {"F1-14 micro-F1": 0.6123, "F1-14 macro-F1": 0.4, "F1-5 micro-F1": 0.7, "F1-5 macro-F1": 0.65,
                      "BLEU-4": 0.0912, "ROUGE-L": 0.2754}
    assert {(r.dataset_type, r.dataset_split) for r in card.data.eval_results} == {("mimic", "test")}
    assert "| mimic | test | F1-14 micro-F1 | 0.6123 |" in card.text


def test_an_adapter_names_its_base_as_peft_does(tmp_path):
    model_card.write(tmp_path, {**TRAINED, "format": "peft"})
    card = ModelCard.load(tmp_path / "README.md")
    assert (card.data.library_name, card.data.base_model) == ("peft", "ECOFRI/CXR-LLAVA-v2")
    assert {"lora", "base_model:adapter:ECOFRI/CXR-LLAVA-v2"} <= set(card.data.tags)


@pytest.mark.parametrize("where", ["no card", "hub cache"])
def test_evaluations_leave_other_models_alone(tmp_path, where):
    model = tmp_path / ("models--a--b/snapshots/" + "0" * 40 if where == "hub cache" else "release")
    model.mkdir(parents=True)
    if where == "hub cache":
        model_card.write(model, TRAINED)
    before = sorted(p.read_bytes() for p in model.iterdir())
    assert not model_card.add_evaluation(model, card_evaluation(RESULTS))
    assert sorted(p.read_bytes() for p in model.iterdir()) == before
