"""The model's side of an evaluation: answers for every image of a test set, written as JSONL records.

A test set is a dataset adapter's split (`config.dataset`, `config.split`). The kind of answer asked for
(`config.answer_kind`) decides the prompt and the reference: "report" asks for the radiologic report and compares
with the record's report; "json_labels" asks for the 14 labels as JSON and compares with the record's labels.
Records without a reference are left out (and counted). The JSONL is what `eval.py --predictions` reads, so a run
can be re-scored without a model.
"""

import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cxrllava_jax import files
from cxrllava_jax.domain.findings import CHEXPERT_OBSERVATIONS
from cxrllava_jax.domain import prompting
from cxrllava_jax.errors import ConfigError, InputError
from input_pipeline.records import relative_name
from input_pipeline.sources import ADAPTERS

PROMPTS = {"report": prompting.REPORT_PROMPT, "json_labels": prompting.LABEL_PROMPT}


def test_records(config, data_dir) -> tuple[list, int]:
    """(records of the test split that have a reference for the answer kind, number left out without one)."""
    if config.dataset not in ADAPTERS:
        raise ConfigError(f"config.dataset={config.dataset!r}: adapters exist for {sorted(ADAPTERS)}")
    records = ADAPTERS[config.dataset](Path(data_dir), config.split)
    usable = [r for r in records if _reference(config.answer_kind, r) is not None]
    return usable, len(records) - len(usable)


def generate_records(config, model, data_dir, out_path, batch_size: int = 16, limit=None) -> list[dict]:
    """Greedy answers for the test split (its first `limit` usable records); writes and returns {id, image,
    generated, reference} records."""
    records, skipped = test_records(config, data_dir)
    records = records[:limit]
    if not records:
        raise InputError(f"{data_dir}: the {config.dataset} {config.split} split has no records with a reference "
                         f"for {config.answer_kind} answers ({skipped} without)")
    conversation = [{"role": "user", "content": PROMPTS[config.answer_kind]}]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    answers = {}
    with tqdm(total=len(records), desc="generating", unit="image", file=sys.stderr) as progress:
        # Nothing follows these answers: their keys and values are not kept for follow-ups.
        for index, answer in model.iter_generate([conversation] * len(records), [r.image for r in records],
                                                 batch_size=batch_size, keep=False, temperature=0.0):
            answers[index] = answer
            progress.update()
    results = []
    with files.replaced_atomically(out_path) as out:
        for index, record in enumerate(records):
            # The path under the data directory: file names alone repeat (CheXpert's view1_frontal.jpg).
            result = {"id": relative_name(record.image, data_dir), "image": str(record.image),
                      "generated": answers[index].text, "reference": _reference(config.answer_kind, record),
                      "provenance": {**model.provenance, **answers[index].record()}}
            out.write(json.dumps(result) + "\n")
            results.append(result)
    if skipped:
        print(f"[eval] {skipped} {config.dataset} {config.split} records have no reference and were left out")
    return results


def _reference(answer_kind: str, record):
    if answer_kind == "report":
        return record.report or None
    if np.isnan(record.labels).all():
        return None
    return {name: (None if np.isnan(v) else float(v)) for name, v in zip(CHEXPERT_OBSERVATIONS, record.labels)}
