"""The worker that batches concurrent requests into the generator.

Jobs wait in a bounded queue. One worker thread takes every waiting job that can share a batch with the oldest
one (all greedy jobs can; sampled jobs need equal temperature, top-p and seed, which the generator takes per
batch), up to `max_batch_size`, and runs them as one batch; jobs that arrive meanwhile form the next batch.
The generator reports each row's new tokens every few steps (`stream_every` when a row streams, `check_every`
otherwise: each report costs a trip to the host). The worker streams them as text to the jobs that asked,
cuts each row at its own `max_tokens`, and ends the batch early once every row is finished or its client has
gone (so a disconnected client frees its slot within a few tokens).

A row's greedy answer equals what `CXRLLaVA` gives for the same request alone: rows of a batch do not see
each other, and a row cut at its own token budget wrote the same tokens as a run with that budget.
"""

import collections
import dataclasses
import logging
import threading
from typing import Callable

import numpy as np

from cxrllava_jax.errors import ConfigError
from cxrllava_jax.inference.api import TextStream
from cxrllava_jax.inference.generate import SamplingOptions

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TextDelta:
    text: str


@dataclasses.dataclass(frozen=True)
class Finished:
    text: str
    finish_reason: str  # "stop" (EOS) or "length" (the token budget)
    completion_tokens: int


@dataclasses.dataclass(frozen=True)
class Failed:
    error: Exception


@dataclasses.dataclass(eq=False)
class Job:
    """One request for the worker. `sink` receives its TextDelta (when `stream`), then Finished or Failed; it is
    called on the worker thread."""

    prompt: np.ndarray
    pixels: np.ndarray
    sampling: SamplingOptions
    sink: Callable[[object], None]
    stream: bool = False
    cancelled: bool = False

    @property
    def batch_key(self) -> tuple:
        s = self.sampling
        return ("greedy",) if s.temperature == 0 else (s.temperature, s.top_p, s.seed)


class QueueFull(Exception):
    pass


class Scheduler:
    def __init__(self, model, max_batch_size: int = 16, max_queue: int = 64, stream_every: int = 4,
                 check_every: int = 16):
        if max_batch_size < 1 or max_queue < 1:
            raise ConfigError(f"the batch size and the queue must hold at least one request, got "
                             f"--max-batch-size {max_batch_size} and --max-queue {max_queue}")
        self.model, self.max_batch_size, self.max_queue = model, max_batch_size, max_queue
        self.stream_every, self.check_every = stream_every, check_every
        self._waiting: collections.deque[Job] = collections.deque()
        self._changed = threading.Condition()
        self._closed = False
        # Every key exists from the start: stats() copies it while the worker updates it.
        self.counts = collections.Counter(batches=0, rows=0, abandoned_batches=0, running=0)
        self._thread = threading.Thread(target=self._work, name="cxrllava-batcher", daemon=True)

    def start(self):
        self._thread.start()

    def close(self):
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join()

    def submit(self, job: Job):
        with self._changed:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (the server's limit)")
            self._waiting.append(job)
            self._changed.notify()

    def cancel(self, job: Job):
        """The client has gone: a waiting job leaves the queue, a running one stops at its next chunk."""
        with self._changed:
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)

    def stats(self) -> dict:
        with self._changed:
            return {"waiting": len(self._waiting), **self.counts}

    # ---------------------------------------------------------------- the worker thread

    def _work(self):
        while (batch := self._take_batch()) is not None:
            self.counts["running"] = len(batch)
            try:
                self._run(batch)
            except Exception as error:  # the server keeps serving; these requests get a 500
                log.exception("a batch of %d failed", len(batch))
                for job in batch:
                    job.sink(Failed(error))
            self.counts["running"] = 0

    def _take_batch(self) -> list[Job] | None:
        with self._changed:
            while not self._waiting and not self._closed:
                self._changed.wait()
            if self._closed:
                return None
            key = self._waiting[0].batch_key
            batch = [job for job in self._waiting if job.batch_key == key][:self.max_batch_size]
            for job in batch:
                self._waiting.remove(job)
            return batch

    def _run(self, batch: list[Job]):
        context = self.model.config.llama.max_position_embeddings
        rows = [_Row(job, min(job.sampling.max_new_tokens, context - len(job.prompt) - 1), self.model.tokenizer)
                for job in batch]
        options = dataclasses.replace(batch[0].sampling, max_new_tokens=max(row.budget for row in rows))

        def on_tokens(chunks: list[list[int]]):
            steps = max(map(len, chunks))
            for row, chunk in zip(rows, chunks):
                row.extend(chunk, ended=len(chunk) < steps)
            if all(row.over for row in rows):
                raise _BatchOver

        every = self.stream_every if any(job.stream for job in batch) else self.check_every
        self.counts["batches"] += 1
        self.counts["rows"] += len(rows)
        try:
            outputs = self.model.generator.generate([job.prompt for job in batch], np.stack([j.pixels for j in batch]),
                                                    options, on_tokens=on_tokens, stream_every=every)
        except _BatchOver:
            self.counts["abandoned_batches"] += 1
            outputs = [row.ids for row in rows]
        for row, ids in zip(rows, outputs):
            if not row.job.cancelled:
                row.finish(ids, self.model.decode)


class _BatchOver(Exception):
    """Raised from the token callback to stop the generator: no row needs more tokens."""


class _Row:
    """One job's tokens as the batch writes them, cut at its budget."""

    def __init__(self, job: Job, budget: int, tokenizer):
        self.job, self.budget = job, budget
        self.ids: list[int] = []
        self.ended = False
        self.text = TextStream(tokenizer, lambda piece: job.sink(TextDelta(piece))) if job.stream else None

    @property
    def over(self) -> bool:
        return self.ended or len(self.ids) >= self.budget or self.job.cancelled

    def extend(self, chunk: list[int], ended: bool):
        if self.over:
            return
        new = chunk[:self.budget - len(self.ids)]
        self.ids += new
        self.ended = ended
        if self.text is not None and new:
            self.text([new])

    def finish(self, ids: list[int], decode):
        ids = ids[:self.budget]
        answer = decode(ids)
        if self.text is not None:
            self.text.finish(answer)
        self.job.sink(Finished(answer, "length" if len(ids) >= self.budget else "stop", len(ids)))
