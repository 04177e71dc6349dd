"""Sequence buckets: stage 2 batches cut to a length chosen from the data train exactly like batches padded to
`config.data.seq_length` (right padding only ever holds padding, which causal attention never reads)."""

import jax
import numpy as np
import pytest

from cxrllava_jax.training import stage_records
from cxrllava_jax.training.steps import TrainState, init_opt_state, make_train_step
from cxrllava_jax.training.tasks import make_task
from input_pipeline import pipelines
from tests import training_setup as setup

STEPS = 4


def test_buckets_come_from_the_data_quantiles():
    assert pipelines.choose_buckets([100, 130, 300, 1400], 2048, 4) == (128, 256, 384, 1408)
    assert pipelines.choose_buckets([5000], 2048, 2) == (2048,)


@pytest.mark.slow
def test_bucketed_training_equals_padded_training(tmp_path_factory):
    data_dir, tokenizer_dir = setup.dataset(str(tmp_path_factory.getbasetemp() / "training_data"))
    cfg = setup.parse(setup.stage_flags("2b", data_dir, tokenizer_dir, steps=STEPS))
    task = make_task(cfg)
    examples = task.examples(stage_records.load(cfg, cfg.data.train_split))
    encode = task.encoder()
    buckets = task.sequence_buckets(examples)
    assert buckets.sizes[-1] == cfg.data.seq_length and len(buckets.sizes) > 1, buckets.sizes

    tx, _ = task.optimizer(100)
    # Jitted: made eagerly, every primitive of the model's forward pass is a compile of its own.
    params = jax.tree.map(lambda x: getattr(x, "value", x),
                          jax.jit(lambda rng: task.init(rng, task.dummy_batch(1))["params"])(jax.random.key(0)),
                          is_leaf=lambda x: hasattr(x, "value"))
    step = jax.jit(make_train_step(task, tx, tuple(cfg.frozen)))

    def train(bucketing):
        batches = iter(pipelines.batches(examples, encode, 8, seed=0, repeat=True, buckets=bucketing))
        state = TrainState(step=0, params=params, opt_state=init_opt_state(tx, params, tuple(cfg.frozen)))
        losses, lengths = [], []
        for _ in range(STEPS):
            batch = next(batches)
            lengths.append(batch["tokens"].shape[1])
            state, _, loss = step(state, batch, jax.random.key(1))
            losses.append(float(loss))
        return losses, lengths, state.params

    padded_losses, padded_lengths, padded_params = train(None)
    bucketed_losses, bucketed_lengths, bucketed_params = train(buckets)
    assert set(padded_lengths) == {cfg.data.seq_length}
    assert max(bucketed_lengths) < cfg.data.seq_length, bucketed_lengths  # the synthetic studies are short
    np.testing.assert_allclose(bucketed_losses, padded_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), bucketed_params, padded_params)
