"""The server's side of the inference engine: jobs in, events out, the engine stepping in its worker thread.

The engine (`inference.engine.Engine`) batches concurrent requests continuously: a request that arrives while
others decode joins them at the next chunk of steps, and a row that ends frees its place at once. The server's
engine is its own, beside the library's (its rows and queue are the server's settings; its prefix cache holds
what the server's clients asked, so a client resending a conversation prefills only its new turn). Here a job's
tokens become text events for the jobs that stream, and its end a Finished event; a job whose client has gone
leaves the batch at the next chunk.

A job's answer equals what `CXRLLaVA` gives for the same request alone: the engine's output depends only on the
request.
"""

import dataclasses
from typing import Callable

import numpy as np

from cxrllava_jax.errors import ConfigError
from cxrllava_jax.inference import engine
from cxrllava_jax.inference.api import Answer, TextStream
from cxrllava_jax.inference.engine import EngineImage, Request, SamplingOptions


@dataclasses.dataclass(frozen=True)
class TextDelta:
    text: str


@dataclasses.dataclass(frozen=True)
class Finished:
    answer: Answer

    @property
    def text(self) -> str:
        return self.answer.text

    @property
    def finish_reason(self) -> str:  # "stop" (EOS) or "length" (the token budget)
        return self.answer.completion.finish_reason

    @property
    def completion_tokens(self) -> int:
        return len(self.answer.completion.tokens)


@dataclasses.dataclass(frozen=True)
class Failed:
    error: Exception


@dataclasses.dataclass(eq=False)
class Job:
    """One request for the engine. `sink` receives its TextDelta (when `stream`), then Finished or Failed; it is
    called on the engine's thread."""

    prompt: np.ndarray
    pixels: np.ndarray  # [images, H, W, C], in the order of the prompt's image places
    sampling: SamplingOptions
    sink: Callable[[object], None]
    stream: bool = False
    handle: engine.Handle | None = None

    # time.monotonic() when it joined the batch and when its first token came: the access log and metrics read them
    @property
    def admitted_at(self) -> float | None:
        return None if self.handle is None else self.handle.admitted_at

    @property
    def first_token_at(self) -> float | None:
        return None if self.handle is None else self.handle.first_token_at


class QueueFull(Exception):
    pass


class Scheduler:
    def __init__(self, model, max_batch_size: int = 16, max_queue: int = 64, cache_bytes: int | None = None):
        if max_batch_size < 1 or max_queue < 1:
            raise ConfigError(f"the batch size and the queue must hold at least one request, got "
                              f"--max-batch-size {max_batch_size} and --max-queue {max_queue}")
        self.model = model
        settings = {} if cache_bytes is None else {"cache_bytes": cache_bytes}
        self.engine = model.engine.sibling(max_rows=max_batch_size, max_waiting=max_queue, **settings)

    def start(self):
        self.engine.start()

    def close(self):
        self.engine.close()

    def submit(self, job: Job):
        text = TextStream(self.model.tokenizer, lambda piece: job.sink(TextDelta(piece))) if job.stream else None

        def on_end(handle: engine.Handle):
            if handle.error is not None:
                job.sink(Failed(handle.error))
                return
            answer = Answer(self.model.detokenize(handle.completion.tokens), handle.completion, job.sampling)
            if text is not None:
                text.finish(answer.text)
            job.sink(Finished(answer))

        request = Request(job.prompt, tuple(EngineImage.of(pixels) for pixels in job.pixels), job.sampling)
        try:
            job.handle = self.engine.submit(request, None if text is None else text, on_end)
        except engine.QueueFull as error:
            raise QueueFull(f"{error} (the server's limit)") from None

    def cancel(self, job: Job):
        """The client has gone: a waiting job leaves the queue, a running one leaves the batch at its next chunk."""
        if job.handle is not None:
            self.engine.cancel(job.handle)

    def stats(self) -> dict:
        return self.engine.stats()
