"""`cxrllava report` at archive scale: images/s with images read and preprocessed ahead of the model (worker
processes, `inference.prefetch`) against one at a time as the model needs them.

    python benchmarks/bench_archive.py      # prints the figures, writes benchmarks/results/archive.json

The archive: 200 files, half 1024x1024 8-bit PNGs, half 1024x1024 12-bit DICOMs compressed as JPEG 2000 (what a
PACS export holds; decoding one costs far more than a decode step of a small model). The model is the tests'
tiny checkpoint, whose decode steps cost little, so the reading of images is what the pool can hide. Each
figure is one whole pass over the archive with the compiled programs already warm (an untimed pass compiles
them), greedy reports of at most MAX_TOKENS tokens, batch 8; the records of both passes must be equal. Then the
command itself runs on the archive (`--workers`, a --jsonl): 200 records, each with its provenance.

The ceiling: reading the archive alone (preprocessing every file in this process, timed too) is work the
workers can spread over the machine's cores, the model's part of a pass is not; so a pass cannot take less
than max(one-at-a-time pass / cores, one-at-a-time pass - preprocessing alone), and on a machine busy with other
work less still is gained.
"""

import json
import os
import pathlib
import platform
import sys
import tempfile
import time

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import JPEG2000Lossless, SecondaryCaptureImageStorage, generate_uid

from cxrllava_jax.domain import prompting
from input_pipeline import synthetic

# JAX, the model and the command are imported in main(): the image workers import this module (their main).

ROOT = pathlib.Path(__file__).resolve().parents[1]
FILES = 200
SIZE = 1024
MAX_TOKENS = 32
WORKERS = os.cpu_count() or 1


def write_archive(folder: pathlib.Path) -> list[pathlib.Path]:
    paths = []
    for i in range(FILES):
        rng = np.random.default_rng(i)
        gray = synthetic.draw_radiograph(synthetic.sample_findings(rng), SIZE, rng)
        if i % 2:
            path = folder / f"study{i:03d}.png"
            Image.fromarray(gray).save(path)
        else:
            path = folder / f"study{i:03d}.dcm"
            _write_j2k_dicom(path, gray.astype(np.uint16) * 16)
        paths.append(path)
    return paths


def _write_j2k_dicom(path, stored: np.ndarray):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.compress(JPEG2000Lossless, stored.astype(np.uint16))
    ds.save_as(path, enforce_file_format=True)


def one_pass(model, paths, workers: int) -> tuple[float, float, dict]:
    """(seconds, CPU seconds of this process, the reports)."""
    conversations = [[{"role": "user", "content": prompting.REPORT_PROMPT}]] * len(paths)
    start, cpu = time.perf_counter(), time.process_time()
    answers = {i: a.text for i, a in model.iter_generate(conversations, paths, batch_size=8, keep=False,
                                                         workers=workers, temperature=0.0, max_new_tokens=MAX_TOKENS)}
    return time.perf_counter() - start, time.process_time() - cpu, answers


def main() -> int:
    from cxrllava_jax import cli
    from cxrllava_jax.inference.api import CXRLLaVA
    from cxrllava_jax.reference.tiny_models import checkpoint_dir

    load_before = os.getloadavg()
    print(f"load average before: {load_before}", flush=True)
    model = CXRLLaVA.from_pretrained(checkpoint_dir())
    with tempfile.TemporaryDirectory() as folder:
        folder = pathlib.Path(folder)
        paths = write_archive(folder)
        one_pass(model, paths[:16], WORKERS)  # compiles
        start = time.perf_counter()
        for path in paths:
            model.preprocess(path)
        preprocessing = time.perf_counter() - start
        seconds, cpu_seconds, answers = {}, {}, {}
        for workers in (0, WORKERS, 0, WORKERS):  # alternated: a slow spell of the machine hits both
            elapsed, cpu, answers[workers] = one_pass(model, paths, workers)
            seconds.setdefault(workers, []).append(elapsed)
            cpu_seconds.setdefault(workers, []).append(cpu)
        out = folder / "reports.jsonl"
        start = time.perf_counter()
        code = cli.main(["report", str(folder), "--checkpoint", str(checkpoint_dir()), "--jsonl", str(out),
                         "--workers", str(WORKERS), "--temperature", "0", "--max-new-tokens", str(MAX_TOKENS)])
        command_seconds = time.perf_counter() - start
        records = [json.loads(line) for line in out.read_text().splitlines()]
    images = sorted(r["image"] for r in records)
    result = {
        "files": FILES, "png": FILES // 2, "dicom_jpeg2000": FILES - FILES // 2, "size": SIZE,
        "images_per_s_one_at_a_time": FILES / min(seconds[0]), "images_per_s_workers": FILES / min(seconds[WORKERS]),
        "workers": WORKERS, "passes_s": {str(k): v for k, v in seconds.items()},
        "speed_up": min(seconds[0]) / min(seconds[WORKERS]), "same_reports": answers[0] == answers[WORKERS],
        "preprocessing_alone_s": preprocessing,
        # The engine's process: what the workers take off it (the model's work stays), whatever the machine's load.
        "engine_process_cpu_s_each_pass": {str(k): v for k, v in cpu_seconds.items()},
        "speed_up_ceiling": min(seconds[0]) / max(min(seconds[0]) / (os.cpu_count() or 1),
                                                  min(seconds[0]) - preprocessing),
        "command": {"exit": code, "seconds_with_model_load": command_seconds, "records": len(records),
                    "distinct_images": len(set(images)), "with_provenance": sum("provenance" in r for r in records)},
        "max_tokens": MAX_TOKENS, "machine": platform.platform(), "cpus": os.cpu_count(),
        "load_average_before": load_before, "load_average_after": os.getloadavg()}
    print(json.dumps(result, indent=2))
    (ROOT / "benchmarks" / "results" / "archive.json").write_text(json.dumps(result, indent=2) + "\n")
    ok = result["same_reports"] and code == 0 and len(records) == FILES == len(set(images))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
