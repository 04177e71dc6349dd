"""Input pipeline speed: radiographs per second per worker through the Grain pipeline the training stages use.

Two cases, 8-bit grayscale PNG files on local disk -> normalised float32 [512, 512, 1] batches of 32:
- pre-resized: 512x512 files (no resize; the case the goal of >= 400 img/s per worker is for);
- full resolution: 2048x2048 files, LANCZOS down to 512 as the release does.
For each, the single-thread cost of PIL's PNG decode alone and of the whole `images.preprocess` (read, decode,
resize/crop, normalise) shows what bounds the rate; then the pipeline itself: one worker (in-process, one
thread: the per-worker rate), in-process with 4 read threads, and worker processes (mp_prefetch, one thread each).
On a shared machine the figures move with its load, which the results record.

Prints a table and writes benchmarks/results/input_pipeline.json.
"""

import io
import json
import os
import pathlib
import platform
import tempfile
import time

import numpy as np
from PIL import Image

from cxrllava_jax.domain import images
from input_pipeline import pipelines, synthetic

RESULTS = pathlib.Path(__file__).parent / "results" / "input_pipeline.json"
SIZE, BATCH = 512, 32
CASES = {"pre-resized 512 PNG": 512, "full-resolution 2048 PNG": 2048}


def write_radiographs(folder: pathlib.Path, side: int, count: int) -> list[str]:
    """`count` distinct synthetic radiographs with findings, as side x side 8-bit PNGs (Pillow's default level)."""
    rng = np.random.default_rng(side)
    paths = []
    for i in range(count):
        pixels = synthetic.draw_radiograph(synthetic.sample_findings(rng), SIZE, rng)
        image = Image.fromarray(pixels)
        if side != SIZE:  # drawn at 512, enlarged, with full-resolution noise like a detector's
            enlarged = np.asarray(image.resize((side, side), Image.Resampling.BICUBIC), np.float32)
            image = Image.fromarray(np.clip(enlarged + rng.normal(0, 4, enlarged.shape), 0, 255).astype(np.uint8))
        path = folder / f"{side}-{i}.png"
        image.save(path)
        paths.append(str(path))
    return paths


def per_image_ms(fn, items, repeats: int) -> float:
    fn(items[0])
    start = time.perf_counter()
    for k in range(repeats):
        fn(items[k % len(items)])
    return (time.perf_counter() - start) / repeats * 1e3


def step_costs(paths: list[str], repeats: int) -> dict:
    """Single-thread milliseconds per image for each step of turning a file into a normalised array."""
    encoded = [pathlib.Path(p).read_bytes() for p in paths]
    decode = per_image_ms(lambda data: Image.open(io.BytesIO(data)).load(), encoded, repeats)
    preprocess = per_image_ms(lambda p: images.preprocess(p, SIZE, 0.5, 0.5), paths, repeats)
    return {"mean_file_kb": float(np.mean([len(e) for e in encoded]) / 1024), "png_decode_ms": decode,
            "preprocess_ms": preprocess, "decode_bound_img_per_s": 1e3 / decode,
            "preprocess_bound_img_per_s": 1e3 / preprocess}


def pipeline_rate(paths: list[str], batches: int, num_workers: int = 0, read_threads: int = 0) -> float:
    """Images per second out of `pipelines.batches`.

    Timed from the iterator's creation in-process (so no batch is read ahead of the clock), and from the second
    batch with worker processes (their start-up takes seconds; their read-ahead is one batch each).
    """
    def encode(path):  # defined here so worker processes receive it by value
        return {"image": images.preprocess(path, SIZE, 0.5, 0.5)}

    # The files repeated into a dataset of realistic size: grain's index shuffle costs ~1 ms an index on a
    # dataset of 64 but ~13 us on one of 400k, and the benchmark should not time the former.
    examples = paths * (10_000 // len(paths))
    iterator = iter(pipelines.batches(examples, encode, BATCH, seed=0, repeat=True, num_workers=num_workers,
                                      read_threads=read_threads))
    start = time.perf_counter()
    if num_workers:
        next(iterator), next(iterator)
        start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
    seconds = time.perf_counter() - start
    assert batch["image"].shape == (BATCH, SIZE, SIZE, 1)
    iterator.close()
    return batches * BATCH / seconds


def main():
    cores = os.cpu_count()
    workers = max(2, min(4, cores))
    results = {"machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine(),
                           "cpu_count": cores, "load_average_at_start": os.getloadavg()},
               "image_size": SIZE, "batch_size": BATCH, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, side in CASES.items():
            paths = write_radiographs(pathlib.Path(tmp), side, 64 if side == SIZE else 16)
            small = side == SIZE
            case = step_costs(paths, repeats=200 if small else 20)
            batches = 40 if small else 6
            case["one_worker_img_per_s"] = pipeline_rate(paths, batches)
            case["in_process_4_threads_img_per_s"] = pipeline_rate(paths, batches, read_threads=4)
            total = pipeline_rate(paths, batches, num_workers=workers)
            case.update(workers=workers, workers_img_per_s=total, per_worker_img_per_s=total / workers)
            results["cases"][name] = case
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")

    print(f"{cores} CPU cores, load average {results['machine']['load_average_at_start'][0]:.1f} at start; "
          f"batches of {BATCH} x {SIZE}x{SIZE}x1 float32")
    print(f"{'case':26} {'file KB':>8} {'decode ms':>10} {'preprocess ms':>14} {'1 worker img/s':>15} "
          f"{'4 threads':>10} {'N workers img/s':>16} {'per worker':>11}")
    for name, c in results["cases"].items():
        print(f"{name:26} {c['mean_file_kb']:8.0f} {c['png_decode_ms']:10.2f} {c['preprocess_ms']:14.2f} "
              f"{c['one_worker_img_per_s']:15.0f} {c['in_process_4_threads_img_per_s']:10.0f} "
              f"{c['workers_img_per_s']:12.0f} ({c['workers']}) {c['per_worker_img_per_s']:11.0f}")
    print("(decode and preprocess: single-thread ms per image; the 1-worker rate can at best be 1000 / preprocess ms)")


if __name__ == "__main__":
    main()
