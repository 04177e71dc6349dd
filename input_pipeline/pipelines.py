"""Grain pipelines that feed training and evaluation: examples -> shuffled, repeated batches of arrays.

Every stage is fed the same way; what makes the classification (1A), contrastive (1B) and instruction
(2A/2B) pipelines differ is `encode`, the stage's function from one example to arrays
(a training task's `encoder()`). What the pipeline guarantees:

- Sharding by process: every process builds the same stream of *global* batches of example indices and
  decodes only its own contiguous slice of each, so the batches a step sees do not depend on how many
  processes share the work (two processes together see exactly the batches one process sees).
- Seeded shuffling that differs per epoch (grain reseeds `shuffle` under `repeat`), remainder dropped.
- Decoding in `num_workers` processes (grain `mp_prefetch`), each decoding up to `read_threads` batches at
  a time (PIL and numpy release the GIL); the order depends on neither. An element here is a whole batch,
  so the read-ahead is `read_threads` batches per process (grain's default, 500 elements, would hold
  gigabytes of 512-pixel batches).
- A checkpointable position: the iterator's `get_state`/`set_state` (what `grain.checkpoint` saves)
  continue with exactly the batch the interrupted iterator would have produced next.
- Sequence buckets (optional, `Buckets`): a batch's sequence arrays are cut to the smallest bucket that holds
  its longest row, so short samples are not padded to the longest length there is. The longest row is taken
  over the whole global batch (its examples' lengths, computed without decoding images), so every process
  cuts to the same length. Padding is at the end of each row, so the cut drops only padding.
- Bad records: by default the `InputError` naming the file propagates. With `max_bad_fraction > 0` a
  record that cannot be decoded is replaced by a substitute drawn (never itself) from a generator seeded with
  the bad record's index, so batch shapes stay static and every run, resumed or sharded differently, sees the
  same substitutes. The iterator counts the skipped records (`bad_records`, saved in its state) and
  raises `TooManyBadRecords` once they exceed `max_bad_fraction` of the records it has decoded, counting
  at least one epoch of its share so that a bad file early in the first epoch is not a false alarm.
"""

import dataclasses
import logging
from typing import Callable, Sequence

import grain
import jax
import numpy as np
from absl import flags

from cxrllava_jax.errors import ConfigError, InputError

# Substitutes tried for one bad record before giving up: with a tolerable bad fraction, running into
# this many bad records in a row means the data, not a few files, is broken.
MAX_SUBSTITUTES = 16

log = logging.getLogger(__name__)


class TooManyBadRecords(InputError):
    """More records failed to decode than `config.data.max_bad_fraction` allows."""


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Sequence-length buckets: `sizes` ascending, the last one the length `encode` pads every row to.

    `length(example)` is an example's real length (at most `sizes[-1]`); `keys` are the batch arrays whose
    second axis is the sequence. A substitute for a bad record longer than its batch's bucket is cut to it.
    """

    length: Callable[..., int]
    sizes: tuple[int, ...]
    keys: tuple[str, ...]

    def size_for(self, longest: int) -> int:
        return next((s for s in self.sizes if s >= longest), self.sizes[-1])


def choose_buckets(lengths: Sequence[int], max_length: int, count: int, multiple: int = 128) -> tuple[int, ...]:
    """Up to `count` bucket sizes from a sample of the data's lengths: its quantiles 1/count ... 1, rounded up to
    `multiple` (the TPU attention kernel's block) and capped at `max_length`."""
    lengths = np.minimum(np.asarray(lengths), max_length)
    quantiles = np.quantile(lengths, np.arange(1, count + 1) / count, method="inverted_cdf")
    return tuple(sorted({min(int(-(-q // multiple) * multiple), max_length) for q in quantiles}))


def batches(examples: Sequence, encode: Callable[..., dict], batch_size: int, *, seed: int | None = None,
            repeat: bool = False, num_workers: int = 0, read_threads: int = 4, max_bad_fraction: float = 0.0,
            buckets: Buckets | None = None, process_index: int | None = None,
            process_count: int | None = None) -> grain.IterDataset:
    """Global batches of `batch_size` examples (remainder dropped); this process's slice encoded and stacked.

    `examples` is any random-access sequence (a list of stage examples, a TFDS data source); `seed=None`
    keeps their order. `process_index`/`process_count` default to JAX's. Iterating gives dicts of numpy
    arrays with a leading dimension of `batch_size // process_count`.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if batch_size % process_count:
        raise ConfigError(f"batch size {batch_size} does not split over {process_count} processes")
    if not 0.0 <= max_bad_fraction < 1.0:
        raise ConfigError(f"max_bad_fraction must be in [0, 1), got {max_bad_fraction}")
    if len(examples) < batch_size:
        raise ConfigError(f"{len(examples)} examples are fewer than one batch of {batch_size}")
    local = batch_size // process_count
    decode = _DecodeSlice(examples, encode, slice(process_index * local, (process_index + 1) * local),
                          substitute_seed=seed or 0, skip_bad=max_bad_fraction > 0, buckets=buckets)
    ds = grain.MapDataset.range(len(examples))
    if seed is not None:
        ds = ds.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat()
    read_ahead = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=read_threads)
    ds = ds.batch(batch_size, drop_remainder=True).map(decode).to_iter_dataset(read_ahead)
    if num_workers > 0:
        if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags; outside absl.app use defaults
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return _CountBadRecords(ds, max_bad_fraction, records_per_epoch=len(examples) // process_count)


class _DecodeSlice:
    """Global batch of example indices -> (this process's rows encoded and stacked, messages of bad records)."""

    def __init__(self, examples, encode, rows: slice, substitute_seed: int, skip_bad: bool,
                 buckets: Buckets | None = None):
        self.examples, self.encode, self.rows = examples, encode, rows
        self.substitute_seed, self.skip_bad, self.buckets = substitute_seed, skip_bad, buckets

    def __call__(self, indices: np.ndarray) -> tuple[dict, list[str]]:
        bad, batch = [], None
        rows = indices[self.rows]
        for row, index in enumerate(rows):
            example = self._encode(int(index), bad)
            if batch is None:
                batch = {k: np.empty((len(rows), *np.shape(v)), np.asarray(v).dtype) for k, v in example.items()}
            for k, v in example.items():  # copied while still in cache: much cheaper than np.stack at the end
                batch[k][row] = v
        if self.buckets is not None:
            size = self.buckets.size_for(max(self.buckets.length(self.examples[int(i)]) for i in indices))
            batch.update({k: np.ascontiguousarray(batch[k][:, :size]) for k in self.buckets.keys})
        return batch, bad

    def _encode(self, index: int, bad: list[str]) -> dict:
        if not self.skip_bad:
            return self.encode(self.examples[index])
        substitutes = np.random.default_rng([self.substitute_seed, index])
        candidate = index
        for _ in range(MAX_SUBSTITUTES):
            try:
                return self.encode(self.examples[candidate])
            except InputError as error:
                bad.append(str(error))
            candidate = (index + 1 + int(substitutes.integers(len(self.examples) - 1))) % len(self.examples)
        raise TooManyBadRecords(f"example {index} and {MAX_SUBSTITUTES - 1} substitutes drawn for it all failed to "
                                f"decode; the last: {bad[-1]}")


class _CountBadRecords(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, max_bad_fraction: float, records_per_epoch: int):
        super().__init__(parent)
        self.max_bad_fraction, self.records_per_epoch = max_bad_fraction, records_per_epoch

    def __iter__(self) -> "BatchIterator":
        return BatchIterator(self._parent.__iter__(), self.max_bad_fraction, self.records_per_epoch)


class BatchIterator(grain.DatasetIterator):
    """The pipeline's iterator: batches of arrays, plus the running count of bad records it skipped."""

    def __init__(self, parent: grain.DatasetIterator, max_bad_fraction: float, records_per_epoch: int):
        super().__init__(parent)
        self.max_bad_fraction, self.records_per_epoch = max_bad_fraction, records_per_epoch
        self.records_read = 0  # decode attempts, substitutes included
        self.bad_records = 0

    def __next__(self) -> dict:
        batch, bad = next(self._parent)
        self.records_read += len(next(iter(batch.values()))) + len(bad)
        for message in bad:
            self.bad_records += 1
            log.warning("skipped bad record %d: %s", self.bad_records, message)
        if self.bad_records > self.max_bad_fraction * max(self.records_read, self.records_per_epoch):
            raise TooManyBadRecords(
                f"{self.bad_records} of the {self.records_read} records read so far could not be decoded: more than "
                f"config.data.max_bad_fraction={self.max_bad_fraction} of them (or of one epoch's "
                f"{self.records_per_epoch}, early on) allows; the last: {bad[-1]}")
        return batch

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state(), "records_read": self.records_read,
                "bad_records": self.bad_records}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self.records_read, self.bad_records = state["records_read"], state["bad_records"]
