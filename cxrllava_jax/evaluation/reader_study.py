"""The paper's reader study (Table 5) as a tool: a blinded rating sheet, and the analysis of the returned ratings.

Export: each case contributes two items, the model's report and the ground-truth report, each beside the image;
all items are shuffled with a seed and numbered, so the sheet shows neither the source nor which items pair up.
The key (item -> case, source) is written to a separate file for the analysis.
Analysis: radiologists rate each item A-D; per source the class counts, the A+B ("successful autonomous
reporting") rate, and Cochran's Q test of A+B across sources, with (reader, case) as blocks.
"""

import collections
import contextlib
import csv
import pathlib
import random

import numpy as np
from scipy import stats

from cxrllava_jax import files
from cxrllava_jax.errors import InputError

SOURCES = ("model", "ground_truth")
RATING_CLASSES = {
    "A": "acceptable without any revision",
    "B": "acceptable after minor revision",
    "C": "acceptable after major revision",
    "D": "unacceptable",
}
SUCCESS_CLASSES = ("A", "B")
SHEET_COLUMNS = ("item", "image", "report", "rating", "comment")
KEY_COLUMNS = ("item", "case", "source")


def export_sheet(records, sheet_path, key_path, seed=0) -> None:
    """records: {id, image, generated, reference (text)}. Writes the blinded sheet and its key."""
    items = []
    for record in records:
        for field in ("id", "image", "generated", "reference"):
            if not isinstance(record.get(field), str):
                raise InputError(f"reader-study record {record.get('id')!r}: {field!r} must be text")
        items.append((record["id"], record["image"], "model", record["generated"]))
        items.append((record["id"], record["image"], "ground_truth", record["reference"]))
    random.Random(seed).shuffle(items)
    width = len(str(len(items)))
    names = [f"item-{i + 1:0{width}d}" for i in range(len(items))]
    with contextlib.ExitStack() as pair:  # both renamed into place only once both are complete: a sheet and its key
        _write_csv(pair.enter_context(files.replaced_atomically(sheet_path, newline="")), SHEET_COLUMNS,
                   [(n, image, text, "", "") for n, (_, image, _, text) in zip(names, items)])
        _write_csv(pair.enter_context(files.replaced_atomically(key_path, newline="")), KEY_COLUMNS,
                   [(n, case, source) for n, (case, _, source, _) in zip(names, items)])


def analyze_ratings(key_path, rating_paths) -> dict:
    """Rating sheets (one per reader, named by file stem) + key -> Table 5 counts, A+B rates, Cochran's Q."""
    key = {row["item"]: (row["case"], row["source"]) for row in _read_csv(key_path)}
    ratings = {}  # (reader, case) -> {source: class}
    unrated = 0
    for path in rating_paths:
        reader = pathlib.Path(path).stem
        for line, row in enumerate(_read_csv(path), 2):
            rating = (row.get("rating") or "").strip().upper()
            if not rating:
                unrated += 1
                continue
            if rating not in RATING_CLASSES or row["item"] not in key:
                raise InputError(f"{path}:{line}: item {row['item']!r} rating {row.get('rating')!r}: expected a key "
                                 f"item and one of {list(RATING_CLASSES)}")
            case, source = key[row["item"]]
            ratings.setdefault((reader, case), {})[source] = rating
    counts = {s: collections.Counter(r[s] for r in ratings.values() if s in r) for s in SOURCES}
    per_source = {}
    for source, counter in counts.items():
        total = sum(counter.values())
        success = sum(counter[c] for c in SUCCESS_CLASSES)
        per_source[source] = {
            "ratings": total,
            "classes": {c: counter[c] for c in RATING_CLASSES},
            "success": success,
            "success_rate": success / total if total else float("nan"),
        }
    complete = [r for r in ratings.values() if all(s in r for s in SOURCES)]
    success = np.array([[r[s] in SUCCESS_CLASSES for s in SOURCES] for r in complete], dtype=np.int64)
    q, p = cochrans_q(success.reshape(-1, len(SOURCES)))
    return {
        "per_source": per_source,
        "unrated_items": unrated,
        "cochran_q": {"statistic": q, "df": len(SOURCES) - 1, "p_value": p, "blocks": len(complete)},
    }


def cochrans_q(outcomes) -> tuple:
    """Cochran's Q for a (blocks, treatments) 0/1 array: (Q, p) with Q ~ chi2(treatments - 1) under H0."""
    x = np.asarray(outcomes, dtype=np.float64)
    k = x.shape[1]
    column_totals, row_totals, total = x.sum(0), x.sum(1), x.sum()
    denominator = k * total - (row_totals**2).sum()
    if denominator == 0:  # every block rated all treatments alike: no evidence of a difference
        return 0.0, 1.0
    q = (k - 1) * (k * (column_totals**2).sum() - total**2) / denominator
    return float(q), float(stats.chi2.sf(q, k - 1))


def _write_csv(f, columns, rows):
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)


def _read_csv(path):
    return [row for _, row in files.read_csv_records(path)[1]]
