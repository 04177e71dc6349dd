"""Every stage's task trains on a fixed batch; frozen parameters stay put and carry no optimizer state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from configs import demo
from cxrllava_jax.training.optim import build_optimizer, split_trainable
from cxrllava_jax.training.steps import TrainState, init_opt_state, make_train_step
from cxrllava_jax.training.tasks import make_task


def fixed_batch(task, stage, rng):
    batch = task.dummy_batch(8)
    images = jax.random.normal(rng, batch["image"].shape)
    batch["image"] = images
    if stage == "1a":
        batch["label"] = (images.mean(axis=(1, 2, 3)) > 0).astype(jnp.int32)
    elif stage.startswith("1b"):
        batch["input_ids"] = jax.random.randint(rng, batch["input_ids"].shape, 3, 500)
    else:
        tokens = np.array(batch["tokens"])
        tokens[:, -40:] = np.random.RandomState(0).randint(3, 200, (8, 40))
        batch["tokens"] = jnp.asarray(tokens)
        batch["loss_mask"] = batch["loss_mask"].at[:, -40:].set(True)
    return batch


@pytest.mark.parametrize("stage", ["1a", "1b_labels", "2a", "2b"])
def test_loss_falls_and_frozen_parameters_stay(stage):
    cfg = demo.get_config(stage)
    cfg.model.text = "bert_tiny"  # the real MiniLM is exercised by the parity tests; keep this one fast
    cfg.model.llama_overrides = {"vocab_size": 1024}
    # Stage 2A trains only the projector, which moves the loss more slowly than whole towers do.
    cfg.optim.update(name="adam", learning_rate=3e-2 if stage == "2a" else 3e-3)
    task = make_task(cfg)
    batch = fixed_batch(task, stage, jax.random.key(1))
    params = task.init(jax.random.key(0), batch)["params"]
    params = jax.tree.map(lambda x: getattr(x, "value", x), params, is_leaf=lambda x: hasattr(x, "value"))
    tx, _ = build_optimizer(cfg.optim, 100)
    frozen = tuple(cfg.frozen) + (("txt/.*",) if cfg.text_unfreeze_step else ())
    state = TrainState(step=0, params=params, opt_state=init_opt_state(tx, params, frozen))
    before = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    step = jax.jit(make_train_step(task, tx, frozen))
    losses = []
    for _ in range(8):
        state, _, loss = step(state, batch, jax.random.key(2))
        losses.append(float(loss))
    if stage == "2a":  # a projector under a frozen random LLM: slow, but every step must help
        assert all(b < a for a, b in zip(losses, losses[1:])) and losses[0] - losses[-1] > 0.05, losses
    else:
        assert losses[-1] < 0.8 * losses[0], losses

    after = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
    _, fixed = split_trainable(params, frozen)
    assert fixed or not frozen
    for path in fixed:
        np.testing.assert_array_equal(after[path], before[path], err_msg=path)
    assert any(not np.array_equal(after[p], before[p]) for p in after if p not in fixed)
    state_paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)}
    assert not [p for p in state_paths if any(f"'{f}'" in p for f in fixed)], "frozen params have optimizer state"
    if frozen:
        assert state_paths, "trainable params must have optimizer state under Adam"


def test_released_group_trains_from_its_step_and_others_keep_their_state():
    """A release is a schedule inside the optimizer: before it the group stays put with zero moments, from it on
    the group trains; the state keeps one structure and the other parameters' moments carry on."""
    import ml_collections

    cfg = ml_collections.ConfigDict(dict(name="adam", learning_rate=1e-2, momentum=0.0, b1=0.9, b2=0.999, eps=1e-8,
                                         weight_decay=0.0, warmup_steps=0, schedule="constant", end_lr_fraction=0.0,
                                         grad_clip_norm=0.0, grad_accum_steps=1))
    tx, _ = build_optimizer(cfg, total_steps=10, releases=(("txt/.*", 3),))
    params = {"img/w": jnp.ones(3), "txt/w": jnp.ones(2)}
    state = tx.init(params)
    structure = jax.tree.structure(state)
    grads = {"img/w": jnp.ones(3), "txt/w": jnp.ones(2)}
    moved = []
    for _ in range(5):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        moved.append(bool(np.any(np.asarray(updates["txt/w"]) != 0)))
        assert jax.tree.structure(state) == structure
    assert moved == [False, False, False, True, True]
    mu = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(state) if "mu" in jax.tree_util.keystr(p)}
    img_mu = [v for k, v in mu.items() if "img/w" in k][0]
    txt_mu = [v for k, v in mu.items() if "txt/w" in k][0]
    np.testing.assert_allclose(img_mu, 1 - 0.9 ** 5, rtol=1e-6)  # five steps of moments
    np.testing.assert_allclose(txt_mu, 1 - 0.9 ** 2, rtol=1e-6)  # two: it started from zero at the release


def test_freezing_everything_is_refused():
    with pytest.raises(ValueError, match="freezes every parameter"):
        split_trainable({"img": {"w": jnp.ones(1)}}, (".*",))


def test_accumulation_schedules_over_optimizer_updates():
    """With gradients accumulated over 2 steps, 8 steps are 4 updates, and the schedule runs over those 4."""
    import ml_collections

    cfg = ml_collections.ConfigDict(dict(name="sgd", learning_rate=1.0, momentum=0.0, b1=0.9, b2=0.999, eps=1e-8,
                                         weight_decay=0.0, warmup_steps=0, schedule="linear", end_lr_fraction=0.0,
                                         grad_clip_norm=0.0, grad_accum_steps=2))
    tx, learning_rate = build_optimizer(cfg, total_steps=8)
    params = {"w": jnp.zeros(())}
    state = tx.init(params)
    moves = []
    for step in range(8):
        updates, state = tx.update({"w": jnp.ones(())}, state, params)
        params = optax.apply_updates(params, updates)
        moves.append(float(-updates["w"]))
    np.testing.assert_allclose(moves, [0, 1.0, 0, 0.75, 0, 0.5, 0, 0.25], atol=1e-6)
    np.testing.assert_allclose([float(learning_rate(s)) for s in (0, 1, 2, 7)], [1.0, 1.0, 0.75, 0.25])


def test_stage_2a_starts_from_any_llama_family_model(tmp_path):
    """`config.init.llama` names a Hugging Face directory (here a tiny one with a tied head, Llama 3.1 RoPE and
    grouped-query attention): the stage's model takes that configuration and those weights."""
    import torch
    import transformers

    from cxrllava_jax.convert import hf_llama
    from cxrllava_jax.models.configs import LlamaConfig, RopeScaling
    from cxrllava_jax.training import initial_weights
    from cxrllava_jax.reference.torch_models import hf_llama_config, randomize_

    llama = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                        num_kv_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                        rope_scaling=RopeScaling("llama3", factor=8.0, original_max_position_embeddings=64))
    torch.manual_seed(0)
    randomize_(transformers.LlamaForCausalLM(hf_llama_config(llama)), seed=1).save_pretrained(tmp_path)
    cfg = demo.get_config("2a")
    cfg.init.update(checkpoint="", llama=str(tmp_path))
    cfg.model.llama_overrides = {}  # the demo shrinks its preset; here the directory says what the model is
    task = make_task(cfg)
    assert task.model_config.llama == llama
    params = task.init(jax.random.key(0), task.dummy_batch(1))["params"]
    params = jax.tree.map(lambda x: getattr(x, "value", x), params, is_leaf=lambda x: hasattr(x, "value"))
    placement = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), params)
    loaded = initial_weights.load(cfg, params, placement)
    expected = traverse_util.flatten_dict(hf_llama.load_hf_llama(tmp_path)[1], sep="/")
    got = traverse_util.flatten_dict(jax.device_get(loaded["llm"]), sep="/")
    assert got.keys() == expected.keys() and "lm_head/kernel" not in got
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_scored_positions_loss_equals_full_logits_loss():
    """Stage 2 projects only the scored positions onto the vocabulary; the loss is the full-logits one."""
    cfg = demo.get_config("2b")
    task = make_task(cfg)
    batch = fixed_batch(task, "2b", jax.random.key(4))
    rng = np.random.RandomState(1)
    length = batch["tokens"].shape[1]
    answer_start = rng.randint(task.model_config.num_image_tokens + 2, length - 50, 8)
    ends = answer_start + rng.randint(5, 45, 8)
    positions = np.arange(length)
    batch["tokens"] = jnp.asarray(np.where(positions >= task.model_config.num_image_tokens + 1,
                                           rng.randint(3, 200, (8, length)), np.asarray(batch["tokens"])))
    batch["loss_mask"] = jnp.asarray((positions >= answer_start[:, None]) & (positions < ends[:, None]))
    batch["valid"] = jnp.asarray(positions < (ends + rng.randint(0, 5, 8))[:, None])  # right-padded rows
    params = task.init(jax.random.key(0), batch)["params"]
    loss, outputs = task.loss(params, batch, jax.random.key(0), train=False)

    logits, _ = task.model.apply({"params": params}, batch["image"], batch["tokens"], batch["valid"])
    targets, weights = batch["tokens"][:, 1:], batch["loss_mask"][:, 1:].astype(jnp.float32)
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], jnp.maximum(targets, 0))
    expected = (per_token * weights).sum() / weights.sum()
    accuracy = ((jnp.argmax(logits[:, :-1], -1) == targets) * weights).sum() / weights.sum()
    assert logits.dtype == jnp.float32
    assert abs(float(loss) - float(expected)) <= 1e-6, (float(loss), float(expected))
    assert float(outputs["token_accuracy"]) == float(accuracy)
    assert float(outputs["tokens"]) == float(weights.sum())


@pytest.mark.parametrize("stage", ["1a", "1b_labels", "2b"])
def test_images_reach_the_model_as_the_release_preprocesses_them(stage):
    """The uint8 pixels a batch carries, normalised by the task inside the jitted step, are the release's
    preprocessing of the same image (CLIPImageProcessor semantics, `images.preprocess`) to within one float32
    rounding: no second normalisation, no default mean/std in place of the configured ones."""
    from cxrllava_jax.domain import images
    from cxrllava_jax.training.tasks.base import Example

    cfg = demo.get_config(stage)
    cfg.model.text = "bert_tiny"
    cfg.data.update(image_mean=0.4, image_std=0.3)
    task = make_task(cfg)
    radiograph = np.random.RandomState(5).randint(0, 256, (80, 96), dtype=np.uint8)
    pixels = task.image(Example(image=radiograph))
    assert pixels.dtype == np.uint8
    on_device = np.asarray(jax.jit(task.model_images)(jnp.asarray(pixels[None])))[0]
    expected = images.preprocess(radiograph, task.image_size(), 0.4, 0.3)
    assert on_device.dtype == np.float32 and on_device.shape == expected.shape
    # XLA may fuse x * (1/255) - mean into one multiply-add, which rounds once instead of twice.
    np.testing.assert_allclose(on_device, expected, rtol=0, atol=np.spacing(np.float32(np.abs(expected).max())))
