"""The worker that batches concurrent requests into the generator, continuously.

Jobs wait in a bounded queue. One worker thread keeps a running batch (`inference.continuous.RunningBatch`) and
alternates: every waiting job that fits (up to `max_batch_size` rows in use) is prefilled as one group into free
rows, then the batch decodes a chunk of steps (`stream_every` when a row streams, `check_every` otherwise: each
chunk costs a trip to the host). So a request that arrives while others decode joins them at the next chunk,
and a row that ends (EOS, its `max_tokens`) frees its place at once. The worker streams each row's new tokens
as text to the jobs that asked; a job whose client has gone leaves the batch at the next chunk.

A row's answer equals what `CXRLLaVA` gives for the same request alone: rows do not see each other, each reads
only its own cache slots at its own positions, and each samples with its own seed.
"""

import collections
import dataclasses
import logging
import threading
import time
from typing import Callable

import numpy as np

from cxrllava_jax.errors import ConfigError
from cxrllava_jax.inference.api import TextStream
from cxrllava_jax.inference.continuous import RunningBatch
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
    admitted_at: float | None = None  # time.monotonic() when it joined the batch and when its first token came:
    first_token_at: float | None = None  # the server's access log and metrics read them


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
        self._batch = RunningBatch(model.generator, max_batch_size, chunk=max(stream_every, check_every))
        self._rows: dict[Job, _Row] = {}
        # Every key exists from the start: stats() copies it while the worker updates it. batches: groups
        # prefilled together; rows: requests admitted; chunks, row_chunks: decode chunks and the rows they ran.
        self.counts = collections.Counter(batches=0, rows=0, chunks=0, row_chunks=0, abandoned_rows=0, running=0)
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
        """The client has gone: a waiting job leaves the queue, a running one leaves the batch at its next chunk."""
        with self._changed:
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)

    def stats(self) -> dict:
        with self._changed:
            return {"waiting": len(self._waiting), **self.counts}

    # ---------------------------------------------------------------- the worker thread

    def _work(self):
        while (admitted := self._take()) is not None:
            try:
                if admitted:
                    self._admit(admitted)
                if self._rows:
                    self._decode()
            except Exception as error:  # the server keeps serving; these requests get a 500
                log.exception("a batch of %d failed", len(self._rows) + len(admitted))
                for job in {*self._rows, *admitted}:
                    job.sink(Failed(error))
                self._rows.clear()
                self._batch = RunningBatch(self.model.generator, self.max_batch_size, self._batch.chunk)
            self.counts["running"] = len(self._rows)

    def _take(self) -> list[Job] | None:
        """The waiting jobs that join the batch now (oldest first, as many as fit); None once closed."""
        with self._changed:
            while not self._waiting and not self._rows and not self._closed:
                self._changed.wait()
            if self._closed:
                return None
            admitted, free = [], self._batch.free
            while self._waiting and len(admitted) < free:
                candidate = self._waiting[0]
                if admitted and not self._batch.fits([j.prompt for j in admitted + [candidate]],
                                                     [self._budget(j) for j in admitted + [candidate]]):
                    break
                admitted.append(self._waiting.popleft())
            return admitted

    def _budget(self, job: Job) -> int:
        return min(job.sampling.max_new_tokens, self.model.config.llama.max_position_embeddings - len(job.prompt) - 1)

    def _admit(self, jobs: list[Job]):
        budgets = [self._budget(job) for job in jobs]
        pixels = np.stack([job.pixels for job in jobs])
        self.counts["batches"] += 1
        self.counts["rows"] += len(jobs)
        admitted = time.monotonic()
        for job, budget in zip(jobs, budgets):
            job.admitted_at = admitted
            self._rows[job] = _Row(job, budget, self.model.tokenizer)
        self._deliver(self._batch.admit(jobs, [job.prompt for job in jobs], pixels, budgets,
                                        [job.sampling for job in jobs]))

    def _decode(self):
        for job in [job for job in self._rows if job.cancelled]:
            self._batch.release(job)
            del self._rows[job]
            self.counts["abandoned_rows"] += 1
        if not self._rows:
            return
        self.counts["chunks"] += 1
        self.counts["row_chunks"] += len(self._rows)
        streaming = any(job.stream for job in self._rows)
        self._deliver(self._batch.run(self.stream_every if streaming else self.check_every))

    def _deliver(self, results):
        for job, tokens, ended in results:
            row = self._rows[job]
            row.extend(tokens)
            if ended:
                del self._rows[job]
                row.finish(self.model.decode)


class _Row:
    """One job's tokens as the batch writes them."""

    def __init__(self, job: Job, budget: int, tokenizer):
        self.job, self.budget = job, budget
        self.ids: list[int] = []
        self.text = TextStream(tokenizer, lambda piece: job.sink(TextDelta(piece))) if job.stream else None

    def extend(self, tokens: list[int]):
        if tokens and self.job.first_token_at is None:
            self.job.first_token_at = time.monotonic()
        self.ids += tokens
        if self.text is not None and tokens and not self.job.cancelled:
            self.text([tokens])

    def finish(self, decode):
        answer = decode(self.ids)
        if self.text is not None:
            self.text.finish(answer)
        self.job.sink(Finished(answer, "length" if len(self.ids) >= self.budget else "stop", len(self.ids)))
