"""The release's Python interface on the tiny model: parity with the release's PyTorch forward on image
prompts, both checkpoint kinds, batches, every image kind, chat, streaming and clear errors."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cxrllava_jax.convert import release
from cxrllava_jax.domain import prompting
from cxrllava_jax.models import quantize
from cxrllava_jax.inference.api import CXRLLaVA, TextStream
from cxrllava_jax.inference.engine import EngineImage, Request, SamplingOptions
from cxrllava_jax.domain.tokenizer import load_tokenizer, train_tokenizer
from cxrllava_jax.domain.images import InputError
from cxrllava_jax.domain.radiograph_guard import NotFrontalChestError
from cxrllava_jax.domain.studies import Study, studies_in_folder
from tests.dicom_files import write_dicom, write_two_studies
from cxrllava_jax.reference.tiny_models import (checkpoint_dir, release_dir, synthetic_radiograph, tiny_config,
                                                 tokenizer_dir)
from cxrllava_jax.reference.torch_models import IMAGE_PLACEHOLDER, ReleaseCXRLLaVA

GREEDY = dict(temperature=0.0, max_new_tokens=12)
REPORT = [{"role": "user", "content": prompting.REPORT_PROMPT}]
QUESTION = [{"role": "user", "content": prompting.question_prompt("Is there a pleural effusion?")}]
NEVER = -1  # an EOS id no token equals


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    return [synthetic_radiograph(folder / f"cxr{i}.png", seed=i) for i in range(3)]


def _release_torch_model(config):
    torch_model = ReleaseCXRLLaVA(config)
    state = {}
    for shard in sorted(release_dir().glob("*.safetensors")):
        state.update(load_file(shard))
    torch_model.load_state_dict(state)
    return torch_model.eval()


def _torch_greedy(torch_model, pixels, ids, steps, eos_id):
    """The release's semantics, recomputed in full each step: one placeholder -> projected image tokens."""
    embeds = torch_model.multimodal_embeds(torch.as_tensor(pixels).permute(0, 3, 1, 2),
                                           torch.as_tensor(ids[None], dtype=torch.long))
    out = []
    with torch.no_grad():
        for _ in range(steps):
            hidden = torch_model.llama(inputs_embeds=embeds).last_hidden_state
            token = int(torch_model.lm_head(hidden[:, -1]).argmax(-1))
            if token == eos_id:
                break
            out.append(token)
            embeds = torch.cat([embeds, torch_model.llama.embed_tokens(torch.tensor([[token]]))], dim=1)
    return out


def test_image_prompts_match_the_release_forward_in_pytorch(model, images):
    converted = CXRLLaVA.from_pretrained(release_dir())  # the release's directory, converted on the fly
    # EOS masked on both sides (no token equals it): whole continuations are compared, whatever the untrained
    # model prefers. Stopping at EOS is tests/test_generate.py's.
    converted.engine.spec = dataclasses.replace(converted.engine.spec, eos_id=NEVER)
    torch_model = _release_torch_model(tiny_config(converted.config.llama.vocab_size))
    conversations = [REPORT, QUESTION]
    pixels = np.stack([converted.preprocess(i) for i in images[:2]])
    ours = [c.tokens for c in converted.engine.complete(
        [Request(converted.encode(c), (EngineImage.of(p),), SamplingOptions(**GREEDY)) for c, p in
         zip(conversations, pixels)])]
    tokenizer = converted.tokenizer
    for row, turns in enumerate(conversations):
        ids = prompting.encode_prompt(turns, tokenizer, num_image_tokens=1, image_token_id=IMAGE_PLACEHOLDER)
        assert ours[row] == _torch_greedy(torch_model, pixels[row:row + 1], ids, GREEDY["max_new_tokens"], NEVER)
    assert list(map(len, ours)) == [GREEDY["max_new_tokens"]] * 2
    # Our checkpoint of the same weights answers the same.
    assert model.generate(conversations, images[:2], **GREEDY) == [converted.detokenize(ids) for ids in ours]


def test_batch_equals_one_by_one(model, images, monkeypatch):
    # EOS masked: every report is its whole budget long, so rows of a batch cannot end at different steps by luck.
    monkeypatch.setattr(model.engine, "spec", dataclasses.replace(model.engine.spec, eos_id=NEVER))
    reports = model.write_radiologic_reports(images, **GREEDY)
    assert reports == [model.write_radiologic_report(i, **GREEDY) for i in images]
    assert len(set(reports)) > 1  # the images make the answers differ


def _full_range_gray(path):
    pixels = np.asarray(Image.open(path).convert("L"), np.float64)
    return np.rint((pixels - pixels.min()) / (pixels.max() - pixels.min()) * 255).astype(np.uint8)


def test_every_image_kind_gives_the_same_report(model, images, tmp_path):
    gray = _full_range_gray(images[0])  # full 8-bit range: 16-bit and DICOM versions window back exactly
    Image.fromarray(gray).save(tmp_path / "8bit.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "16bit.png")
    kinds = [tmp_path / "8bit.png", str(tmp_path / "16bit.png"), Image.fromarray(gray), gray,
             write_dicom(tmp_path / "cxr.dcm", gray.astype(np.uint16) * 257, bits_stored=16)]
    for kind in kinds[1:]:
        np.testing.assert_array_equal(model.preprocess(kind), model.preprocess(kinds[0]))
    reports = model.write_radiologic_reports(kinds[:4], **GREEDY)
    assert reports == [model.write_radiologic_report(kinds[4], **GREEDY)] * 4


def test_a_batch_answers_every_input_and_says_how(model, images, tmp_path):
    """A bad image gets its error in its place, the others their reports; every answer says where it came from."""
    (tmp_path / "notes.png").write_text("not an image")
    reports = model.write_radiologic_reports([images[0], tmp_path / "notes.png", images[1]], **GREEDY)
    assert isinstance(reports[1], InputError) and "notes.png" in str(reports[1])
    assert reports[0::2] == [model.write_radiologic_report(images[0], **GREEDY),
                             model.write_radiologic_report(images[1], **GREEDY)]
    with pytest.raises(InputError, match="notes.png"):
        model.write_radiologic_report(tmp_path / "notes.png", **GREEDY)
    index, answer = next(model.iter_generate([[{"role": "user", "content": "Any effusion?"}]], [images[0]], **GREEDY))
    record = {**model.provenance, **answer.record()}
    assert record["checkpoint"] == str(checkpoint_dir()) and record["fingerprint"].startswith("sha256:")
    assert record["adapter"] is None and record["seed"] == 0 and record["temperature"] == 0.0
    assert record["completion_tokens"] == len(answer.completion.tokens) <= GREEDY["max_new_tokens"]
    assert record["finish_reason"] == ("length" if record["completion_tokens"] == GREEDY["max_new_tokens"] else "stop")
    assert record["prompt_tokens"] == len(model.encode([{"role": "user", "content": "Any effusion?"}]))


def test_questions_and_chat(model, images):
    question = "Is there a pleural effusion?"
    answer = model.ask_question(question, images[0], **GREEDY)
    assert model.chat([{"role": "user", "content": question}], images[0], **GREEDY) == answer
    assert model.ask_questions([question, question], images[:2], **GREEDY)[0] == answer
    history = [{"role": "user", "content": question}, {"role": "assistant", "content": "No."},
               {"role": "user", "content": "Is the heart enlarged?"}]
    follow_up = model.chat(history, images[0], **GREEDY)
    with_marker = [{**history[0], "content": f"<image>\n{question}"}] + history[1:]
    assert model.chat(with_marker, images[0], **GREEDY) == follow_up
    differential = [{"role": "user", "content": prompting.DIFFERENTIAL_PROMPT}]
    assert model.write_differential_diagnosis(images[0], **GREEDY) == model.chat(differential, images[0], **GREEDY)


def test_chat_streams_the_answer(model, images, monkeypatch):
    # EOS masked (no token equals it) and tokens drawn at temperature 1: the answer is 40 tokens long whatever
    # the untrained model prefers, so the stream has many pieces on any CPU.
    monkeypatch.setattr(model.engine, "spec", dataclasses.replace(model.engine.spec, eos_id=NEVER))
    pieces = []
    answer = model.chat([{"role": "user", "content": "Describe the lungs."}], images[1], on_text=pieces.append,
                        temperature=1.0, top_p=1.0, seed=1, max_new_tokens=40)
    assert len(pieces) > 1
    assert "".join(pieces) == answer


def test_text_stream_waits_for_whole_characters(model):
    tokenizer = model.tokenizer
    text = "Small left pleural effusion, 2 cm, 37°C. No pneumothorax."
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = []
    stream = TextStream(tokenizer, pieces.append)
    for i in range(len(ids)):
        stream(ids[i:i + 1])
    stream.finish(model.detokenize(ids))
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_streamed_text_waits_for_a_run_of_byte_pieces_to_end(model):
    """SentencePiece decodes a run of byte-fallback pieces as a whole: ")" from <0x29> turns into U+FFFD once an
    invalid byte follows it, so the stream sends nothing of a run until a normal piece ends it."""
    tokenizer = model.tokenizer
    ids = tokenizer.convert_tokens_to_ids(["<0x29>", "<0xE8>", "<0x79>", "<0x1A>"]) + tokenizer.encode(
        "There is", add_special_tokens=False)
    pieces = []
    stream = TextStream(tokenizer, pieces.append)
    for i in range(len(ids)):
        stream(ids[i:i + 1])
    answer = model.detokenize(ids)
    stream.finish(answer)
    assert "".join(pieces) == answer and answer.endswith("There is")


def test_text_stream_waits_for_a_whole_run_of_byte_tokens(model):
    """A lone byte token reads as itself (`<0x19>` -> '\x19'), but a run of bytes that is no UTF-8 reads as
    replacement characters: the stream must not send the lone reading."""
    tokenizer = model.tokenizer
    byte_ids = [tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in (0x19, 0x80)]
    ids = tokenizer.encode("edema", add_special_tokens=False) + byte_ids + tokenizer.encode(" effusion",
                                                                                          add_special_tokens=False)
    pieces = []
    stream = TextStream(tokenizer, pieces.append)
    for i in range(len(ids)):
        stream(ids[i:i + 1])
    stream.finish(model.detokenize(ids))
    assert "".join(pieces) == model.detokenize(ids)


def test_sampling_is_reproducible_by_seed(model, images):
    first = model.write_radiologic_report(images[0], max_new_tokens=12, seed=5)
    assert model.write_radiologic_report(images[0], max_new_tokens=12, seed=5) == first


def test_unreadable_image_names_the_file(model, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(InputError, match="broken.png: cannot decode image"):
        model.write_radiologic_report(broken)
    with pytest.raises(InputError, match="missing.png: image file not found"):
        model.write_radiologic_report(tmp_path / "missing.png")


def test_overlong_question_gives_the_lengths(model, images):
    with pytest.raises(prompting.PromptTooLongError, match=r"\d+ tokens \(16 of them image positions\).*context is 512"):
        model.ask_question("effusion " * 600, images[0])


def test_bad_generation_options_are_refused(model, images):
    with pytest.raises(ValueError, match="top_p"):
        model.write_radiologic_report(images[0], top_p=0.0)
    with pytest.raises(TypeError, match="beam"):
        model.write_radiologic_report(images[0], beams=4)


def test_tokenizer_of_another_model_is_refused(tmp_path):
    mismatched = tmp_path / "ckpt"
    shutil.copytree(checkpoint_dir(), mismatched)
    shutil.rmtree(mismatched / "tokenizer")
    train_tokenizer(["a small left pleural effusion", "no pneumothorax"] * 50, 300, mismatched / "tokenizer")
    size = len(load_tokenizer(mismatched / "tokenizer"))
    with pytest.raises(ValueError, match=f"tokenizer has {size} tokens but the model's vocabulary has 512"):
        CXRLLaVA.from_pretrained(mismatched)


def test_directory_that_is_no_model_is_refused(tmp_path):
    with pytest.raises(InputError, match="neither a cxrllava-jax checkpoint"):
        CXRLLaVA.from_pretrained(tmp_path)


def test_bfloat16_weights_load_as_stored(tmp_path, images):
    """A release directory in bfloat16 (as released) loads without a float32 copy of its parameters."""
    config, params = release.load_release(release_dir())
    release.save_release(tmp_path / "bf16", config, params, "bfloat16")
    for f in tokenizer_dir().iterdir():
        shutil.copy(f, tmp_path / "bf16" / f.name)
    loaded = CXRLLaVA.from_pretrained(tmp_path / "bf16")
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(loaded.engine.params)}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    # It answers: EOS masked, the whole budget is written and read back as the answer's text.
    loaded.engine.spec = dataclasses.replace(loaded.engine.spec, eos_id=NEVER)
    (_, answer), = loaded.iter_generate([REPORT], [images[0]], **GREEDY)
    assert len(answer.completion.tokens) == GREEDY["max_new_tokens"]
    assert answer.text == loaded.detokenize(answer.completion.tokens)


def test_int8_model_answers_and_is_saved_quantized(tmp_path, images):
    int8 = CXRLLaVA.from_pretrained(checkpoint_dir(), quantize="int8")
    kernel = int8.engine.params["params"]["llm"]["layers"]["block_0"]["q_proj"]["kernel"]
    assert quantize.is_quantized(kernel) and kernel.array.qvalue.dtype == jnp.int8
    assert not quantize.is_quantized(int8.engine.params["params"]["img"]["conv1"]["kernel"])
    reports = int8.write_radiologic_reports(images[:2], **GREEDY)
    int8.save(tmp_path / "int8")
    again = CXRLLaVA.from_pretrained(tmp_path / "int8")
    assert again.quantize == "int8"
    assert again.write_radiologic_reports(images[:2], **GREEDY) == reports
    with pytest.raises(ValueError, match="holds int8 weights; it cannot be loaded as int4"):
        CXRLLaVA.from_pretrained(tmp_path / "int8", quantize="int4")


SHARDED_LOAD = """
import dataclasses, json, sys
import jax, numpy as np

from cxrllava_jax.inference.api import CXRLLaVA
from cxrllava_jax.inference.engine import EngineImage, Request, SamplingOptions
from cxrllava_jax.reference.tiny_models import checkpoint_dir
model = CXRLLaVA.from_pretrained(checkpoint_dir())
model.engine.spec = dataclasses.replace(model.engine.spec, eos_id=int(sys.argv[1]))
kernel = model.engine.params["params"]["llm"]["layers"]["block_0"]["q_proj"]["kernel"]
pixels = np.zeros((1, 64, 64, 1), np.float32)
ids = [c.tokens for c in model.engine.complete([Request(model.encode([{"role": "user", "content": "Any effusion?"}]),
                                                        (EngineImage.of(pixels[0]),),
                                                        SamplingOptions(temperature=0.0, max_new_tokens=4))])]
print("REPORT" + json.dumps({"devices": jax.device_count(), "spec": [str(a) for a in kernel.sharding.spec],
                             "shard": list(kernel.addressable_shards[0].data.shape), "full": list(kernel.shape),
                             "tokens": len(ids[0])}))
"""


def test_several_devices_hold_the_parameters_split_by_heads():
    """With 4 devices the language model's heads are split over them (tensor parallel), and it answers."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=str(root))
    result = subprocess.run([sys.executable, "-c", SHARDED_LOAD, str(NEVER)], env=env, cwd=root,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("REPORT"))[6:])
    assert report["devices"] == 4
    assert report["spec"][1] == "tensor"  # [embed, heads, head_dim]: heads over the tensor axis
    assert report["shard"] == [report["full"][0], report["full"][1] // 4, report["full"][2]]
    assert report["tokens"] == 4  # EOS masked: the whole budget, whatever the untrained model prefers


def test_a_study_is_reported_as_one_prompt_and_one_image_as_the_release(model, images, tmp_path):
    """A DICOM study (a PA and a lateral sharing a StudyInstanceUID, a prior PA of an earlier StudyDate): from its
    folder, from its files in any order, or as a Study, the same prompt and report; one image stays the release's
    prompt whichever way it is given; a lateral alone is refused naming its tag; a study past the context is refused
    before any image is read."""
    files = write_two_studies(tmp_path)
    older, study = studies_in_folder(tmp_path)
    turns = [{"role": "user", "content": prompting.REPORT_QUESTION}]
    for one in (images[0], [images[0]], Study.of(images[0], views=["PA"])):
        np.testing.assert_array_equal(model.encode(turns, one), model.encode(REPORT))
    np.testing.assert_array_equal(model.study_pixels(Study.of(images[0]))[0], model.preprocess(images[0]))

    prompt = model.encode(turns, study)
    assert (prompt == model.config.image_token_id).sum() == 3 * model.config.num_image_tokens
    text = model.detokenize([int(i) for i in prompt if i != model.config.image_token_id])
    assert "Current study, 2024-01-05" in text and "Prior study, 2023-03-01" in text
    assert prompting.COMPARISON_QUESTION.strip() in text  # the report of a study with a prior compares
    shuffled = [files["prior"], files["lateral"], files["frontal"]]  # grouped by UID, ordered by date
    np.testing.assert_array_equal(model.encode(turns, shuffled), prompt)
    # The batch `report --studies` makes of this folder (tests/test_inference_cli.py compares the two): each study
    # answers in it as it does alone, the shuffled files as their study.
    assert model.write_radiologic_reports([older, shuffled], **GREEDY) == [
        model.write_radiologic_report(older, **GREEDY), model.write_radiologic_report(study, **GREEDY)]
    np.testing.assert_array_equal(model.encode([{"role": "user", "content": "Unchanged?"}], study),
                                  model.encode([{"role": "user", "content": study.prompt("Unchanged?")}], study))

    with pytest.raises(NotFrontalChestError, match="ViewPosition is 'LL'"):
        model.write_radiologic_report(files["lateral"], **GREEDY)
    missing = [tmp_path / f"missing{i}.png" for i in range(32)]  # never read: the counts refuse it first
    with pytest.raises(prompting.PromptTooLongError, match=r"\(512 of them image positions: 32 images x 16\)"):
        model.write_radiologic_report(missing, **GREEDY)
