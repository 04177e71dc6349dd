"""Fine-tuning with LoRA: a run on a small custom JSONL learns a new report template while the base stays
bit-identical; merged and unmerged adapters agree; the PEFT export is what `peft` applies to our hf-llama
export; an adapter made by `peft` imports back; a killed run resumes exactly; conversation files are checked."""

import dataclasses
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy
import torch
from flax import traverse_util

from cxrllava_jax import sharding
from cxrllava_jax.convert import hf_llama, peft, release
from cxrllava_jax.domain import prompting
from cxrllava_jax.errors import InputError
from cxrllava_jax.inference.api import CXRLLaVA as Assistant
from cxrllava_jax.models import lora, quantize
from cxrllava_jax.models.configs import CXR_LLAVA_PRESETS, Runtime
from cxrllava_jax.models.cxr_llava import CXRLLaVAModel
from cxrllava_jax.training import data as stage_data
from cxrllava_jax.training import loop
from cxrllava_jax.training.checkpoints import RunCheckpoints
from cxrllava_jax.training.optim import split_trainable
from cxrllava_jax.training.steps import jit_train_step
from cxrllava_jax.training.tasks import make_task
from cxrllava_jax.reference.tiny_models import release_dir, synthetic_radiograph
from input_pipeline import conversations
from tests import training_setup as setup
from tests.sigkill import kill_when

# The new pattern the fine-tuning data teaches (words the tiny tokenizer has pieces for).
TEMPLATE = "FINDINGS: The heart size is normal. IMPRESSION: No acute cardiopulmonary process."
STEPS = 60


def write_template_data(root: Path, count: int = 24) -> Path:
    """A folder of radiographs and a LLaVA JSONL whose every answer is TEMPLATE; image paths relative."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    with open(root / "train.jsonl", "w", encoding="utf-8") as f:
        for i in range(count):
            synthetic_radiograph(root / "images" / f"{i}.png", seed=i)
            turns = [{"from": "human", "value": prompting.REPORT_PROMPT}, {"from": "gpt", "value": TEMPLATE}]
            f.write(json.dumps({"image": f"images/{i}.png", "conversations": turns}) + "\n")
    return root / "train.jsonl"


def finetune_flags(train_file: Path, steps: int = STEPS, **overrides) -> list[str]:
    values = {"init.release": release_dir(), "data.train": train_file, "runtime.dtype": "float32",
              "runtime.scan": False, "runtime.remat_policy": "none", "data.seq_length": 192, "data.batch_size": 8,
              "num_train_steps": steps, "optim.learning_rate": 1e-2, "optim.warmup_steps": 0, "log_every_steps": 1,
              "lora.rank": 8, "lora.dropout": 0.0, "checkpoint.async_save": False, "checkpoint.every_steps": 20}
    values.update(overrides)
    return ["--config=configs/finetune.py"] + [f"--config.{k}={v}" for k, v in values.items()]


def report(model: Assistant, image) -> str:
    return model.write_radiologic_report(image, temperature=0.0, max_new_tokens=40)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    train_file = write_template_data(root / "data")
    workdir = root / "run"
    loop.train_and_evaluate(setup.parse(finetune_flags(train_file)), workdir)
    return workdir, root / "data" / "images" / "0.png"


@pytest.mark.slow
def test_lora_learns_the_template_and_leaves_the_base_untouched(trained):
    workdir, image = trained
    base = Assistant.from_pretrained(release_dir())
    assert base.detokenize(base.tokenizer.encode(TEMPLATE, add_special_tokens=False)) == TEMPLATE
    before = report(base, image)
    losses = setup.train_losses(workdir)
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; before: {before!r}")
    assert before != TEMPLATE
    assert losses[-1] < losses[0] / 3
    assert report(Assistant.from_pretrained(workdir / "model"), image) == TEMPLATE  # merged
    assert report(Assistant.from_pretrained(release_dir(), adapter=workdir / "adapter"), image) == TEMPLATE

    # Each checkpoint holds what trains, the adapters (and their optimizer state), not the base, which is
    # referenced once by where it came from.
    state = ocp.StandardCheckpointer().restore((workdir / "checkpoints" / str(STEPS) / "state").absolute())
    stored = traverse_util.flatten_dict(state["params"], sep="/")
    assert stored and all(lora.is_adapter(k) for k in stored)
    assert any(np.abs(v).max() > 0 for k, v in stored.items() if k.endswith("_lora_b"))
    assert json.loads((workdir / "checkpoints" / "base.json").read_text()) == {"base": str(release_dir()),
                                                                                "quantize": None}


@pytest.mark.slow
@pytest.mark.parametrize("base_quantize", [None, "int8"])
def test_the_train_step_learns_with_the_base_bit_identical(tmp_path, base_quantize):
    """LoRA on a bf16 base and QLoRA on an int8 one: the loss falls, every base weight (quantized ones too) is
    bit for bit what the run started from, and the adapted model's logits equal the merged model's."""
    train_file = write_template_data(tmp_path / "data", count=8)
    quantized = {"lora.base_quantize": base_quantize} if base_quantize else {}
    cfg = setup.parse(finetune_flags(train_file, **quantized, **{"runtime.scan": True,
                                                               "runtime.remat_policy": "nothing_saveable"}))
    task = make_task(cfg)
    tx, _ = task.optimizer(cfg.num_train_steps)
    mesh = sharding.make_mesh(**cfg.mesh.to_dict())
    data = stage_data.make_stage_data(cfg, task)
    checkpoints = RunCheckpoints(tmp_path / "checkpoints", cfg.checkpoint, task.unsaved, task.base_reference())
    with sharding.activate(mesh):
        state, shardings = loop._initial_state(cfg, task, tx, mesh, checkpoints, data.train)
        quantized = [k for k, v in traverse_util.flatten_dict(state.params, sep="/").items() if quantize.is_quantized(v)]
        assert bool(quantized) == (base_quantize is not None) and all(k.startswith("llm/") for k in quantized)
        base = jax.tree.map(np.asarray, split_trainable(state.params, task.frozen)[1])
        step = jit_train_step(task, tx, task.frozen, shardings)
        batch = data.global_batch(next(data.train), mesh)
        losses = []
        for _ in range(30):
            state, _, loss = step(state, batch, jax.random.key(0))
            losses.append(float(loss))
        checkpoints.close()
    print(f"{base_quantize or 'bf16'} base: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < losses[0] / 3
    after = split_trainable(state.params, task.frozen)[1]
    assert jax.tree.structure(after) == jax.tree.structure(base)
    for path in base:
        for was, now in zip(jax.tree.leaves(base[path]), jax.tree.leaves(after[path])):
            np.testing.assert_array_equal(was, np.asarray(now), err_msg=path)
    images = task.model_images(batch["image"])
    evaluated = task.adapted(dataclasses.replace(task.settings, dropout=0.0))
    unmerged, _ = evaluated.apply({"params": state.params}, images, batch["tokens"], batch["valid"])
    merged, _ = task.adapted(None).apply({"params": lora.merge(state.params, task.settings)}, images, batch["tokens"],
                                         batch["valid"])
    np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_a_scanned_stack_is_quantized_layer_by_layer(kind):
    """The inference quantizer and QLoRA's: a stacked [layers, ...] weight gets each layer's own scales, the
    same as the unrolled layers get."""
    config = CXR_LLAVA_PRESETS["cxr_llava_tiny"]
    images, tokens = jnp.zeros((1, 64, 64, 1)), jnp.full((1, config.num_image_tokens + 1), config.image_token_id)

    def template(scan):
        return quantize.abstract_params(quantize.quantized(CXRLLaVAModel(config, Runtime(scan=scan)), kind), images,
                                        tokens)

    layers = jax.random.normal(jax.random.key(0), (config.llama.num_layers, config.llama.hidden_size,
                                                   config.llama.intermediate_size))
    stacked = quantize.quantize_leaf(template(True), "llm/layers/block/up_proj/kernel", layers)
    for i in range(config.llama.num_layers):
        alone = quantize.quantize_leaf(template(False), f"llm/layers/block_{i}/up_proj/kernel", layers[i])
        for got, want in zip(jax.tree.leaves(stacked), jax.tree.leaves(alone)):
            np.testing.assert_array_equal(np.asarray(got[i]), np.asarray(want))


@pytest.mark.parametrize("scan,jit", [(False, False), (False, True), (True, False)])
def test_merged_and_unmerged_adapters_give_the_same_logits(scan, jit):
    """Eager and jitted: traced, the layers multiply flattened kernels, which Qwix must still find."""
    config = CXR_LLAVA_PRESETS["cxr_llava_tiny"]
    runtime = Runtime(dtype="float32", param_dtype="float32", scan=scan, remat_policy="none")
    settings = lora.LoraSettings(rank=4, alpha=8.0, targets=lora.DEFAULT_TARGETS + (lora.PROJECTOR, lora.VIT))
    adapted = lora.with_lora(CXRLLaVAModel(config, runtime), settings)
    images = jax.random.normal(jax.random.key(1), (2, 64, 64, 1))
    tokens = jax.random.randint(jax.random.key(2), (2, 40), 0, config.llama.vocab_size)
    tokens = tokens.at[:, 1:1 + config.num_image_tokens].set(config.image_token_id)
    params = nn.meta.unbox(adapted.init(jax.random.key(0), images, tokens)["params"])
    lora.check_targets(params, settings)
    # LoRA's B starts at zero; give it values so that the adapters change the model.
    flat = {k: (0.05 * jax.random.normal(jax.random.key(hash(k) % 1000), v.shape) if k.endswith("_lora_b") else v)
            for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    params = traverse_util.unflatten_dict(flat, sep="/")
    unmerged, _ = (jax.jit(adapted.apply) if jit else adapted.apply)({"params": params}, images, tokens)
    merged, _ = CXRLLaVAModel(config, runtime).apply({"params": lora.merge(params, settings)}, images, tokens)
    base, _ = CXRLLaVAModel(config, runtime).apply(
        {"params": lora.merge(params, dataclasses.replace(settings, alpha=0.0))}, images, tokens)
    assert float(jnp.abs(unmerged - base).max()) > 1e-2  # the adapters matter
    np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged), atol=1e-5, rtol=0)


def hf_llama_export(tmp_path: Path) -> tuple[Path, object, dict]:
    """Our hf-llama export (fp32) of the tiny release's language model; returns it, the config and params."""
    config, params = release.load_release(release_dir())
    hf_llama.save_hf_llama(tmp_path / "hf", config.llama, params["llm"], "float32")
    return tmp_path / "hf", config, params


def text_logits_ours(config, params, tokens: np.ndarray) -> np.ndarray:
    """Our logits for text-only tokens (no image positions, so the image tower's output is not used)."""
    images = jnp.zeros((tokens.shape[0], config.vision.image_size, config.vision.image_size, 1))
    logits, _ = CXRLLaVAModel(config, Runtime(dtype="float32", param_dtype="float32")).apply(
        {"params": params}, images, jnp.asarray(tokens))
    return np.asarray(logits)


def peft_logits(hf_dir: Path, adapter_dir: Path, tokens: np.ndarray) -> np.ndarray:
    import peft as hf_peft
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    adapted = hf_peft.PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        return adapted(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


@pytest.mark.slow
def test_the_peft_export_applied_by_peft_matches_ours(trained, tmp_path):
    workdir, _ = trained
    hf_dir, config, params = hf_llama_export(tmp_path)
    tokens = np.random.default_rng(0).integers(3, config.llama.vocab_size, (2, 24))
    settings, adapters = peft.load_peft(workdir / "adapter")
    assert settings.rank == 8 and adapters
    ours = text_logits_ours(config, peft.apply_adapter(params, workdir / "adapter"), tokens)
    theirs = peft_logits(hf_dir, workdir / "adapter", tokens)
    assert np.abs(ours - text_logits_ours(config, params, tokens)).max() > 1e-3  # the adapter matters
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("rslora", [False, True])
def test_an_adapter_made_by_peft_imports_back(tmp_path, rslora):
    import peft as hf_peft
    import transformers

    hf_dir, config, params = hf_llama_export(tmp_path)
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    torch.manual_seed(0)
    lora_config = hf_peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "down_proj"],
                                     init_lora_weights=False, use_rslora=rslora)  # B random: the adapter matters
    hf_peft.get_peft_model(model, lora_config).save_pretrained(tmp_path / "adapter")
    tokens = np.random.default_rng(1).integers(3, config.llama.vocab_size, (2, 24))
    ours = text_logits_ours(config, peft.apply_adapter(params, tmp_path / "adapter"), tokens)
    np.testing.assert_allclose(ours, peft_logits(hf_dir, tmp_path / "adapter", tokens), atol=1e-4, rtol=0)
    assert np.abs(ours - text_logits_ours(config, params, tokens)).max() > 1e-3


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(tmp_path):
    train_file = write_template_data(tmp_path / "data", count=16)
    # Killed at step 8 of 16: the 8 steps, checkpoints and export still ahead are the margin that the SIGKILL lands
    # before the run ends.
    args = finetune_flags(train_file, steps=16, **{"checkpoint.every_steps": 4, "lora.dropout": 0.1})
    killed = setup.TrainProcess(args, tmp_path / "killed", log_name="killed.log")
    kill_when(killed, (tmp_path / "killed" / "checkpoints" / "8" / "commit_success.txt").exists, "checkpoint at step 8")
    resumed = setup.TrainProcess(args, tmp_path / "killed", log_name="resumed.log")
    output = resumed.finish()
    assert resumed.returncode == 0 and "resumed from step" in output, output
    assert output.strip().splitlines()[-1].endswith(f"{tmp_path / 'killed' / 'adapter'}, {tmp_path / 'killed' / 'model'}")
    loop.train_and_evaluate(setup.parse(args), tmp_path / "straight")  # the uninterrupted run, in this process
    a, b = (safetensors.numpy.load_file(tmp_path / run / "adapter" / peft.WEIGHTS_NAME) for run in ("killed", "straight"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert setup.train_losses(tmp_path / "killed") == setup.train_losses(tmp_path / "straight")


def test_targets_are_regexes_over_module_paths(tmp_path):
    def adapted_modules(targets: str, **overrides):
        task = make_task(setup.parse(finetune_flags(tmp_path / "unused.jsonl", **{"lora.targets": targets},
                                                    **overrides)))
        params = jax.eval_shape(lambda: task.init(jax.random.key(0), task.dummy_batch(1)))["params"]
        return sorted({k.rsplit("/", 1)[0] for k in traverse_util.flatten_dict(params, sep="/") if lora.is_adapter(k)})

    assert adapted_modules(f"('{lora.PROJECTOR}', 'llm/layers/block_1/v_proj')") == [
        "llm/layers/block_1/v_proj", "projector/linear"]
    assert adapted_modules(f"('{lora.VIT}',)", **{"runtime.scan": True})[0].startswith("img/resblocks/attn/")
    with pytest.raises(ValueError, match="match no dense layer"):
        adapted_modules("('llm/layers/block_0/qproj',)")
    with pytest.raises(ValueError, match="base_quantize"):
        adapted_modules("('llm/.*',)", **{"lora.base_quantize": "nf4"})


def test_conversation_files_name_every_bad_record_with_its_line(tmp_path):
    synthetic_radiograph(tmp_path / "a.png", seed=0)
    good = {"image": "a.png", "conversations": [{"from": "human", "value": "Describe it."},
                                                {"from": "gpt", "value": "Clear lungs."}]}
    (tmp_path / "ok.json").write_text(json.dumps([good, good], indent=2))
    records = conversations.load(tmp_path / "ok.json")
    starts = [n for n, line in enumerate((tmp_path / "ok.json").read_text().splitlines(), 1) if line == "  {"]
    assert [r.origin for r in records] == [f"{tmp_path / 'ok.json'}:{n}" for n in starts]
    assert records[0].image == str(tmp_path / "a.png")
    assert records[0].conversations == [[{"role": "user", "content": "<image>\nDescribe it."},
                                         {"role": "assistant", "content": "Clear lungs."}]]
    bad_turns = {**good, "conversations": [{"from": "gpt", "value": "x"}]}
    lines = [json.dumps(good), "{not json", json.dumps({**good, "image": "missing.png"}), json.dumps(bad_turns)]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError) as error:
        conversations.load(tmp_path / "bad.jsonl")
    message = str(error.value)
    assert "3 bad record(s)" in message
    assert f"{tmp_path / 'bad.jsonl'}:2: not JSON" in message
    assert f"{tmp_path / 'bad.jsonl'}:3: image 'missing.png' not found" in message
    assert f"{tmp_path / 'bad.jsonl'}:4: turn 0 is from 'gpt'" in message
    (tmp_path / "bad.json").write_text(json.dumps([good, {**good, "image": "gone.png"}], indent=2))
    with pytest.raises(InputError, match=r"bad.json:\d+: image 'gone.png'"):
        conversations.load(tmp_path / "bad.json")
    (tmp_path / "reports.csv").write_text('image,report\na.png,"Heart normal.\nLungs clear."\n')
    [record] = conversations.load(tmp_path / "reports.csv")
    assert record.report == "Heart normal.\nLungs clear."
    assert record.conversations == [[{"role": "user", "content": prompting.REPORT_PROMPT},
                                     {"role": "assistant", "content": "Heart normal.\nLungs clear."}]]


def test_the_run_s_model_and_adapter_carry_model_cards(trained):
    from huggingface_hub import ModelCard

    workdir, _ = trained
    model, adapter = (ModelCard.load(workdir / name / "README.md") for name in ("model", "adapter"))
    assert (model.data.library_name, adapter.data.library_name) == ("cxrllava-jax", "peft")
    for card in (model, adapter):
        assert f"Task `finetune` of `train.py`, {STEPS} steps, starting from `config.init.release={release_dir()}`" \
            in card.text and "For research only" in card.text
        assert card.data.base_model is None  # a local base has no Hub id to name
