"""Feeding a stage: records from the dataset adapters -> the task's examples -> Grain -> global jax.Arrays.

The batching, sharding by process, shuffling, worker processes and bad-record handling are
`input_pipeline.pipelines`; the examples and their encoder are the task's; this module adds the config's settings.
The train iterator's state is what the checkpoint stores to resume at the same position; its
`bad_records` attribute counts the records skipped so far (see `config.data.max_bad_fraction`).
"""

import dataclasses
import math
from typing import Callable, Iterator

import jax

from cxrllava_jax import sharding
from cxrllava_jax.training import stage_records
from input_pipeline import pipelines
from cxrllava_jax.errors import ConfigError


@dataclasses.dataclass
class StageData:
    train: pipelines.BatchIterator
    eval: Callable[[], Iterator[dict]] | None  # a fresh pass over the validation split, or None
    steps_per_epoch: int

    @staticmethod
    def global_batch(host_batch: dict, mesh) -> dict:
        """This process's rows of the global batch -> jax.Arrays split over the mesh's batch axes."""
        return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, v.ndim), v)
                for k, v in host_batch.items()}


def make_stage_data(cfg, task) -> StageData:
    encode = task.encoder()
    train_examples = task.examples(stage_records.load(cfg, cfg.data.train_split))
    batch_size = cfg.data.batch_size
    if len(train_examples) < batch_size:
        raise ConfigError(f"the {cfg.data.train_split} split has {len(train_examples)} examples, fewer than "
                          f"config.data.batch_size={batch_size}")
    settings = dict(num_workers=cfg.data.num_workers, max_bad_fraction=cfg.data.max_bad_fraction,
                    buckets=task.sequence_buckets(train_examples))
    train = pipelines.batches(train_examples, encode, batch_size, seed=cfg.data.shuffle_seed, repeat=True,
                              **settings)
    eval_fn = None
    if cfg.data.eval_split:
        eval_examples = task.examples(stage_records.load(cfg, cfg.data.eval_split))
        if len(eval_examples) >= cfg.data.eval_batch_size:
            evaluation = pipelines.batches(eval_examples, encode, cfg.data.eval_batch_size, **settings)
            eval_fn = evaluation.__iter__
        else:  # said out loud: without evaluation there is no best checkpoint either
            print(f"[stage {cfg.task}] no evaluation: the {cfg.data.eval_split!r} split has {len(eval_examples)} "
                  f"examples, fewer than config.data.eval_batch_size={cfg.data.eval_batch_size}", flush=True)
    return StageData(train=train.__iter__(), eval=eval_fn,
                     steps_per_epoch=math.ceil(len(train_examples) / batch_size))
