"""Images read and preprocessed ahead of the engine, in worker processes.

Decoding an image (DICOM's JPEG 2000 above all) and resizing it is pure Python and C code that holds the GIL, so
threads beside the engine only take turns with it; processes run beside it. At most `window` images are on their
way at once, so memory stays bounded however long the archive is, and they come back in the order they were asked
for. A worker makes an input's study, its images' preprocessed pixels and their content digests (the keys of their
features in the prefix cache), so the engine's process decodes and hashes nothing.

Workers are started by Python's fork server, not forked from this process: forking a process that runs XLA's
threads can deadlock the child. As with "spawn", each worker imports the program's main module (Python's rule, so
its work must sit under `if __name__ == "__main__":`), and a main module that imports JAX at its top pays that in
every worker: seconds each, measured. `cxrllava`'s entry point imports nothing heavy, and this module no JAX, so a
worker of the command loads only the image code.
"""

import concurrent.futures
import multiprocessing
import os
import signal
import threading
from typing import Callable, Iterator, Sequence

import numpy as np

from cxrllava_jax.domain.images import normalise
from cxrllava_jax.domain.studies import Study
from cxrllava_jax.inference.prefix_cache import image_digest


def study_pixels(pixels_of: Callable, image) -> tuple[Study, np.ndarray, list[str]]:
    """The study of `image` (an image, a list of them or a Study: `Study.of`), its images' pixels `pixels_of(study)`
    [images, H, W, C] and their digests, in a worker (`pixels_of` must pickle: a module-level function or a
    `functools.partial` of one)."""
    study = Study.of(image)
    pixels = pixels_of(study)
    return study, pixels, [image_digest(p) for p in pixels]


def normalised_pixels(study: Study, size: int, mean: float, std: float, min_size: int, allow_non_frontal: bool,
                      num_image_tokens: int, context: int) -> np.ndarray:
    """float32 [images, size, size, 1]: the study's model pixels (`Study.pixels`) normalised as `images.preprocess`
    normalises one image; a study whose image positions alone leave nothing to generate in `context` is refused
    before any image is read (`Study.check_fits`)."""
    study.check_fits(num_image_tokens, context)
    return normalise(study.pixels(size, allow_non_frontal=allow_non_frontal, min_size=min_size), mean, std)


def ahead(work: Callable, items: Sequence, workers: int, window: int) -> Iterator[tuple[int, Callable]]:
    """(index, a call that returns `work(items[index])` or raises what it raised), in order. With `workers`, up to
    `window` items are worked on ahead in that many processes (`work` and the items must pickle: paths, bytes,
    arrays, PIL images); with 0, each is worked on here when its call is made."""
    if not workers:
        for index, item in enumerate(items):
            yield index, lambda item=item: work(item)
        return
    context = multiprocessing.get_context("forkserver")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_started) as pool:
        pending: list = []
        try:
            for index, item in enumerate(items):
                pending.append((index, pool.submit(work, item)))
                if len(pending) >= window:
                    index, future = pending.pop(0)
                    yield index, future.result
            while pending:
                index, future = pending.pop(0)
                yield index, future.result
        finally:
            for _, future in pending:
                future.cancel()


def _worker_started():
    """A worker leaves stopping to the process it works for: Ctrl-C reaches the whole terminal's process group, and
    the command, interrupted, shuts the pool down (a worker interrupted too would print its own traceback); and a
    worker ends when that process is gone (killed: SIGTERM, SIGKILL, out of memory), instead of waiting forever for
    work, with the fork server, beside nothing."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()  # its sentinel is readable once the process that asked is gone
    threading.Thread(target=lambda: (parent.join(), os._exit(1)), name="parent-watch", daemon=True).start()
