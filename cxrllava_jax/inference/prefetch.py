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

import collections
import concurrent.futures
import functools
import multiprocessing
import os
import signal
import threading
from typing import Callable, Iterator, Sequence

import numpy as np

from cxrllava_jax.domain.images import normalise
from cxrllava_jax.domain.studies import Study
from cxrllava_jax.errors import InputError
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
    arrays, PIL images); with 0, each is worked on here when its call is made.

    A worker that dies (killed by the system for memory, a crash in a decoder's C code) takes the pool and every
    item on its way with it: the pool is started again and the item at the head is worked on alone, in a pool of
    its own; if that kills its worker too, the item's call raises an InputError naming it, and the rest go on. So
    one file that crashes its decoder is skipped and recorded like any bad image, not the end of an archive's run
    (which `--resume` would meet again at the same file)."""
    if not workers:
        for index, item in enumerate(items):
            yield index, lambda item=item: work(item)
        return
    upcoming = enumerate(items)
    pending: collections.deque = collections.deque()  # (index, item, future), at most `window`
    pool = _pool(workers)
    try:
        while True:
            while len(pending) < window and (following := next(upcoming, None)) is not None:
                pending.append((*following, pool.submit(work, following[1])))
            if not pending:
                return
            index, item, future = pending.popleft()
            try:
                outcome = _outcome(future)
            except concurrent.futures.process.BrokenProcessPool:
                pool.shutdown(wait=True, cancel_futures=True)
                outcome = _alone(work, item, index)
                pool = _pool(workers)
                pending = collections.deque((i, it, pool.submit(work, it)) for i, it, _ in pending)
            yield index, outcome
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"),
                                                  initializer=_worker_started)


def _outcome(future) -> Callable:
    """A call that returns the future's value or raises the work's error; a dead pool's BrokenProcessPool is raised
    now."""
    try:
        value = future.result()
    except concurrent.futures.process.BrokenProcessPool:
        raise
    except Exception as error:  # noqa: BLE001 - the work's own error, raised where the caller takes the result
        return functools.partial(_raise, error)
    return lambda: value


def _alone(work: Callable, item, index: int) -> Callable:
    """`item` worked on in a pool of its own, after a worker died while it was on its way: a death now is its own."""
    with _pool(1) as pool:
        try:
            return _outcome(pool.submit(work, item))
        except concurrent.futures.process.BrokenProcessPool:
            name = item if isinstance(item, (str, os.PathLike)) else f"input {index}"
            return functools.partial(_raise, InputError(
                f"{name}: reading it ended its worker process abruptly (killed by the system, e.g. for memory, or a "
                "crash in an image decoder)"))


def _raise(error: Exception):
    raise error


def _worker_started():
    """A worker leaves stopping to the process it works for: Ctrl-C reaches the whole terminal's process group, and
    the command, interrupted, shuts the pool down (a worker interrupted too would print its own traceback); and a
    worker ends when that process is gone (killed: SIGTERM, SIGKILL, out of memory), instead of waiting forever for
    work, with the fork server, beside nothing."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()  # its sentinel is readable once the process that asked is gone
    threading.Thread(target=lambda: (parent.join(), os._exit(1)), name="parent-watch", daemon=True).start()
