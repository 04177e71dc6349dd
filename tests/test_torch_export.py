"""`export-torch --layout release` stands alone in PyTorch: transformers loads it with `trust_remote_code=True` from
the export's own files (our modeling_cxrllava.py, no file of the release's repository), builds the release's
prompts and pixels as we do, gives our logits and writes the same greedy report, through the release's method
names. Its model card is the checkpoint's."""

import jax
import numpy as np
import pytest
import torch
import transformers
from huggingface_hub import ModelCard

from cxrllava_jax import cli
from cxrllava_jax.convert import checkpoint
from cxrllava_jax.domain import prompting
from cxrllava_jax.models.cxr_llava import CXRLLaVAModel
from cxrllava_jax.reference.tiny_models import checkpoint_dir, synthetic_radiograph

TOKENS = 16


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny-release"
    assert cli.main(["export-torch", "--checkpoint", str(checkpoint_dir()), "--out", str(out), "--dtype",
                     "float32"]) == 0
    return out, transformers.AutoModel.from_pretrained(out, trust_remote_code=True).eval()


def test_the_export_carries_its_own_code_and_card(exported):
    out, torch_model = exported
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".py") == ["modeling_cxrllava.py"]
    assert type(torch_model).__module__.endswith("modeling_cxrllava")
    card = ModelCard.load(out / "README.md")
    assert (card.data.library_name, card.data.pipeline_tag) == ("transformers", "image-text-to-text")
    assert "trust_remote_code=True" in card.text and "For research only" in card.text


def test_logits_prompt_and_pixels_equal_ours(exported, model, tmp_path):
    _, torch_model = exported
    image = synthetic_radiograph(tmp_path / "cxr.png", seed=4, size=120)
    turns = [{"role": "user", "content": prompting.REPORT_PROMPT}]
    ours_ids = model.encode(turns)
    theirs_ids = torch_model.prompt_ids(turns)
    image_token = model.config.image_token_id
    assert [t for i, t in enumerate(ours_ids) if t != image_token or ours_ids[i - 1] != image_token] == \
        [image_token if t == -200 else t for t in theirs_ids]
    pixels = model.preprocess(image)
    theirs_pixels = torch_model.preprocess(image)
    np.testing.assert_array_equal(theirs_pixels[0, 0].numpy(), pixels[..., 0])

    config, params = checkpoint.load_model(checkpoint_dir())[1:]
    ours = np.asarray(jax.jit(CXRLLaVAModel(config).apply)({"params": params}, pixels[None], ours_ids[None])[0])[0]
    with torch.no_grad():
        theirs = torch_model(torch.tensor([theirs_ids]), theirs_pixels)[0].numpy()
    assert theirs.shape == ours.shape and np.abs(ours).max() > 1.0
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


def test_the_release_methods_give_our_greedy_answers(exported, model, tmp_path):
    _, torch_model = exported
    image = synthetic_radiograph(tmp_path / "cxr.png", seed=5, size=96)
    greedy = dict(temperature=0.0, max_new_tokens=TOKENS)
    report = model.write_radiologic_report(image, **greedy)
    assert report and torch_model.write_radiologic_report(str(image), **greedy) == report
    assert torch_model.ask_question("Is there an effusion?", str(image), **greedy) == \
        model.ask_question("Is there an effusion?", image, **greedy)
    assert torch_model.write_differential_diagnosis(str(image), **greedy) == \
        model.write_differential_diagnosis(image, **greedy)
