"""Input pipeline speed: radiographs per second per worker through the Grain pipeline the training stages use.

Three cases, each giving batches of 32 model inputs [512, 512, 1]:
- pre-resized: 512x512 PNG files (no resize) -> normalised float32;
- full resolution: 2048x2048 PNG files, LANCZOS down to 512 as the release does -> normalised float32 (what
  stage 1 costs when it decodes files);
- preprocessed records: the `cxrllava preprocess` ArrayRecord of uint8 model pixels -> uint8 batches, which
  training normalises on the accelerator (goal: >= 2,000 img/s per worker).
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
from input_pipeline import pipelines, synthetic, tfds_builders

RESULTS = pathlib.Path(__file__).parent / "results" / "input_pipeline.json"
SIZE, BATCH = 512, 32
CASES = {"pre-resized 512 PNG": 512, "full-resolution 2048 PNG": 2048}
RECORDS_CASE = "preprocessed uint8 records"


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


def per_image_ms(fn, items, repeats: int, clock=time.perf_counter) -> float:
    fn(items[0])
    start = clock()
    for k in range(repeats):
        fn(items[k % len(items)])
    return (clock() - start) / repeats * 1e3


def per_image_cpu_ms(fn, items, repeats: int) -> float:
    """This process's CPU time per image: what a worker would take on an idle core, whatever the load."""
    return per_image_ms(fn, items, repeats, clock=time.process_time)


def step_costs(paths: list[str], repeats: int) -> dict:
    """Single-thread milliseconds per image for each step of turning a file into a normalised array."""
    encoded = [pathlib.Path(p).read_bytes() for p in paths]
    decode = per_image_ms(lambda data: Image.open(io.BytesIO(data)).load(), encoded, repeats)
    preprocess = per_image_ms(lambda p: images.preprocess(p, SIZE, 0.5, 0.5), paths, repeats)
    cpu = per_image_cpu_ms(lambda p: images.preprocess(p, SIZE, 0.5, 0.5), paths, repeats)
    return {"mean_file_kb": float(np.mean([len(e) for e in encoded]) / 1024), "png_decode_ms": decode,
            "preprocess_ms": preprocess, "decode_bound_img_per_s": 1e3 / decode,
            "preprocess_bound_img_per_s": 1e3 / preprocess, "preprocess_cpu_ms": cpu,
            "cpu_bound_img_per_s_per_worker": 1e3 / cpu}


def decode_files(path):
    return {"image": images.preprocess(path, SIZE, 0.5, 0.5)}


def read_pixels(stored):
    return {"image": images.model_pixels(stored, SIZE)}


def pipeline_rate(items: list, batches: int, num_workers: int = 0, read_threads: int = 0,
                  encode=decode_files) -> float:
    """Images per second out of `pipelines.batches`.

    Timed from the iterator's creation in-process (so no batch is read ahead of the clock), and from the second
    batch with worker processes (their start-up takes seconds; their read-ahead is one batch each).
    """
    # The items repeated into a dataset of realistic size: grain's index shuffle costs ~1 ms an index on a
    # dataset of 64 but ~13 us on one of 400k, and the benchmark should not time the former.
    examples = items * (10_000 // len(items))
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


def records_case(folder: pathlib.Path, workers: int) -> dict:
    """Reading `CxrPixels` records (the synthetic set preprocessed at 512): no decoding, no resizing."""
    synthetic.write_dataset(folder / "manual", 64, SIZE, seed=5)
    tfds_builders.build("synthetic", folder / "manual", folder / "tfds", pixels=(SIZE, "crop"))
    stored = [r.image for r in tfds_builders.records("synthetic", folder / "tfds", "train", pixels=(SIZE, "crop"))]
    read = per_image_ms(lambda s: images.model_pixels(s, SIZE), stored, 2000)
    cpu = per_image_cpu_ms(lambda s: images.model_pixels(s, SIZE), stored, 2000)
    case = {"mean_file_kb": SIZE * SIZE / 1024, "png_decode_ms": 0.0, "preprocess_ms": read,
            "preprocess_bound_img_per_s": 1e3 / read, "preprocess_cpu_ms": cpu,
            "cpu_bound_img_per_s_per_worker": 1e3 / cpu}
    case["one_worker_img_per_s"] = pipeline_rate(stored, 200, encode=read_pixels)
    case["in_process_4_threads_img_per_s"] = pipeline_rate(stored, 200, read_threads=4, encode=read_pixels)
    total = pipeline_rate(stored, 200, num_workers=workers, encode=read_pixels)
    case.update(workers=workers, workers_img_per_s=total, per_worker_img_per_s=total / workers)
    return case


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
        results["cases"][RECORDS_CASE] = records_case(pathlib.Path(tmp), workers)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")

    print(f"{cores} CPU cores, load average {results['machine']['load_average_at_start'][0]:.1f} at start; "
          f"batches of {BATCH} x {SIZE}x{SIZE}x1 float32")
    print(f"{'case':26} {'file KB':>8} {'decode ms':>10} {'preprocess ms':>14} {'CPU ms':>7} {'CPU-bound/worker':>17} "
          f"{'1 worker img/s':>15} {'4 threads':>10} {'N workers img/s':>16} {'per worker':>11}")
    for name, c in results["cases"].items():
        print(f"{name:26} {c['mean_file_kb']:8.0f} {c['png_decode_ms']:10.2f} {c['preprocess_ms']:14.2f} "
              f"{c['preprocess_cpu_ms']:7.2f} {c['cpu_bound_img_per_s_per_worker']:17.0f} "
              f"{c['one_worker_img_per_s']:15.0f} {c['in_process_4_threads_img_per_s']:10.0f} "
              f"{c['workers_img_per_s']:12.0f} ({c['workers']}) {c['per_worker_img_per_s']:11.0f}")
    print("(decode and preprocess: single-thread ms per image, for records the read of one example's pixels; "
          "the 1-worker rate can at best be 1000 / preprocess ms; CPU ms is process CPU time, what one worker "
          "needs of an idle core, so CPU-bound/worker is the rate a worker reaches when the machine is not shared)")


if __name__ == "__main__":
    main()
