"""Admission before any image is decoded: a request's place in line and its share of the decoding memory.

A request is priced by its image headers (`UploadedImage.decode_bytes`: the decoder's buffer, numpy's copy of it,
the 8-bit result, the windowing's blocks; a study's images, decoded one after another, by the largest:
`requests.Generation.decode_bytes`) and then
- refused with 503 when `max_queue` requests are already waiting, counting those still being decoded as well as
  those queued for the model, so the queue bounds what the server holds;
- refused with 413 when one of its images alone needs more than the whole decoding budget
  (`Limits.max_decode_bytes`), naming that image's field;
- otherwise it waits until the images being decoded leave room for it in that budget, then decodes.
So at most `max_decode_bytes` of decoding happens at once, whatever arrives together; what a waiting request holds
is its request body (at most `Limits.max_body_bytes`).
"""

import asyncio
import contextlib

from starlette.concurrency import run_in_threadpool

from cxrllava_jax.serving.limits import MIB, RequestError


class Admission:
    def __init__(self, budget_bytes: int, max_queue: int, queued):
        """`queued()`: how many prepared requests wait for the model (the scheduler's queue)."""
        self.budget_bytes, self.max_queue, self.queued = budget_bytes, max_queue, queued
        self.decoding_bytes = 0
        self.preparing = 0
        self._room: asyncio.Condition | None = None

    async def run(self, cost: int, field: str | None, work, *args):
        """`work(*args)` in a worker thread once `cost` bytes of decoding (what the request's images take, the
        image in `field` the most) are admitted."""
        async with self.admitted(cost, field):
            return await run_in_threadpool(work, *args)

    @contextlib.asynccontextmanager
    async def admitted(self, cost: int, field: str | None):
        """Holds `cost` bytes of the decoding budget for the block (waiting for them if need be)."""
        if cost > self.budget_bytes:
            raise RequestError(413, f"{field}: decoding this image needs about {cost / MIB:,.0f} MiB; the server "
                                    f"decodes at most {self.budget_bytes / MIB:,.0f} MiB of images at once",
                               field, "image_too_large")
        waiting = self.preparing + self.queued()
        if waiting >= self.max_queue:
            raise RequestError(503, f"the server is busy: {waiting} requests are already waiting (the server's "
                                    "limit); retry later", code="queue_full")
        room = self._room = self._room or asyncio.Condition()
        self.preparing += 1
        try:
            async with room:
                await room.wait_for(lambda: self.decoding_bytes + cost <= self.budget_bytes)
                self.decoding_bytes += cost
            try:
                yield
            finally:
                async with room:
                    self.decoding_bytes -= cost
                    room.notify_all()
        finally:
            self.preparing -= 1

    def stats(self) -> dict:
        return {"preparing": self.preparing, "decoding_bytes": self.decoding_bytes}
