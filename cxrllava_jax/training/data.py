"""Feeding a stage: records from the dataset adapters -> the stage's view -> Grain -> global jax.Arrays.

Every process builds the same shuffled stream of *global* batches of record indices and decodes only
its own slice of each, so the data a step sees does not depend on how many processes share it (a
2-process run trains on exactly the batches a 1-process run does). The iterator's state is what the
checkpoint stores to resume at the same position.
"""

import dataclasses
import math
from typing import Callable, Iterator

import grain
import jax
import numpy as np

from cxrllava_jax import sharding
from cxrllava_jax.training import stage_records


@dataclasses.dataclass
class StageData:
    train: grain.DatasetIterator
    eval: Callable[[], Iterator[dict]] | None  # a fresh pass over the validation split, or None
    steps_per_epoch: int

    @staticmethod
    def global_batch(host_batch: dict, mesh) -> dict:
        """This process's rows of the global batch -> jax.Arrays split over the mesh's batch axes."""
        return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, v.ndim), v)
                for k, v in host_batch.items()}


def make_stage_data(cfg, task) -> StageData:
    encode = stage_records.encoder(cfg, task)
    train_records = stage_records.load(cfg, cfg.data.train_split)
    batch_size = cfg.data.batch_size
    if len(train_records) < batch_size:
        raise ValueError(f"the {cfg.data.train_split} split has {len(train_records)} records, fewer than "
                         f"config.data.batch_size={batch_size}")
    train = (_batches(train_records, batch_size, encode, cfg, shuffle_seed=cfg.data.shuffle_seed, repeat=True)
             .__iter__())
    eval_fn = None
    if cfg.data.eval_split:
        eval_records = stage_records.load(cfg, cfg.data.eval_split)
        if len(eval_records) >= cfg.data.eval_batch_size:
            eval_fn = lambda: iter(_batches(eval_records, cfg.data.eval_batch_size, encode, cfg))  # noqa: E731
    return StageData(train=train, eval=eval_fn, steps_per_epoch=math.ceil(len(train_records) / batch_size))


def _batches(records: list, global_batch: int, encode, cfg, shuffle_seed=None, repeat=False):
    """Global batches (remainder dropped), this process's slice decoded and stacked."""
    processes, index = jax.process_count(), jax.process_index()
    if global_batch % processes:
        raise ValueError(f"batch size {global_batch} does not split over {processes} processes")
    local = global_batch // processes
    ds = grain.MapDataset.range(len(records))
    if shuffle_seed is not None:
        ds = ds.shuffle(seed=shuffle_seed)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(global_batch, drop_remainder=True)
    ds = ds.map(lambda ids: [records[i] for i in np.asarray(ids)[index * local:(index + 1) * local]])
    ds = ds.map(lambda rows: _stack([encode(r) for r in rows]))
    iter_ds = ds.to_iter_dataset()
    if cfg.data.num_workers > 0:
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.data.num_workers))
    return iter_ds


def _stack(examples: list[dict]) -> dict:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}
