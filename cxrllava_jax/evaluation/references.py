"""`cxrllava report`'s JSONL joined to a reference file by image: the records `run.evaluate_records` scores.

`cxrllava report DIR --jsonl r.jsonl` writes one {"image", "report"} line per image (or {"image", "error"} for an
image it could not read). The reference file is a CSV with an `image` column and either a `report` column (the
reference report, for "report" answers) or the 14 observation columns (labels, for "json_labels" answers; 1, 0,
-1 or empty). Images are matched by their path as written; where the two files name an image differently (an
absolute path on one side, a path under the data directory on the other), by the longest unique tail of the path.
"""

import math
import sys
from pathlib import PurePath

from cxrllava_jax import files
from cxrllava_jax.domain import label_files
from cxrllava_jax.domain.findings import CHEXPERT_OBSERVATIONS
from cxrllava_jax.errors import InputError

_REPORT_COLUMNS = ("report", "reports", "text")


def is_report_output(path) -> bool:
    """Whether a JSONL file holds `cxrllava report` lines rather than eval's {id, generated, reference} records."""
    for _, record in files.read_json_lines(path):
        return isinstance(record, dict) and "image" in record and "generated" not in record
    return False


def joined_records(report_jsonl, references_csv, answer_kind: str) -> list:
    """{id, image, generated, reference} for each image of `report_jsonl` that has a reference; images that failed
    or have no reference are counted on stderr, and none matching at all is an error."""
    references = read_references(references_csv, answer_kind)
    index = _TailIndex(references)
    records, failed, unmatched = [], 0, []
    for line_number, line in files.read_json_lines(report_jsonl):
        if not isinstance(line, dict) or "image" not in line or not ("report" in line or "error" in line):
            raise InputError(f"{report_jsonl}:{line_number}: expected a `cxrllava report` line "
                             '{"image", "report"} (or "error")')
        if "error" in line:
            failed += 1
            continue
        key = index.find(str(line["image"]))
        if key is None:
            unmatched.append(str(line["image"]))
            continue
        records.append({"id": key, "image": str(line["image"]), "generated": str(line["report"]),
                        "reference": references[key]})
    if not records:
        raise InputError(f"{report_jsonl}: none of its {len(unmatched)} images is in {references_csv}"
                         + (f", e.g. {unmatched[0]!r}" if unmatched else ""))
    if failed or unmatched:
        print(f"[eval] scoring {len(records)} images; left out: {failed} that `cxrllava report` could not read, "
              f"{len(unmatched)} without a reference in {references_csv}"
              + (f" (e.g. {unmatched[0]!r})" if unmatched else ""), file=sys.stderr)
    return records


def read_references(path, answer_kind: str) -> dict:
    """{image as written: reference report (text) or labels ({observation: 1.0 / 0.0 / -1.0 / None})}."""
    rows = label_files.csv_rows(path)
    header = [name.strip().lower() for name in (rows[0] if rows else [])]
    if "image" not in header:
        raise InputError(f"{path}: a reference file needs an 'image' column (found {rows[0] if rows else 'nothing'})")
    image = header.index("image")
    if answer_kind == "report":
        text = next((header.index(c) for c in _REPORT_COLUMNS if c in header), None)
        if text is None:
            raise InputError(f"{path}: report answers need a 'report' column with each image's reference report")
    else:
        missing = [o for o in CHEXPERT_OBSERVATIONS if o.lower() not in header]
        if missing:
            raise InputError(f"{path}: {answer_kind} answers need the 14 observation columns; missing {missing}")
    references = {}
    for row_number, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        cell = lambda column: row[column].strip() if column < len(row) else ""  # noqa: E731
        key = cell(image)
        if not key:
            raise InputError(f"{path}: row {row_number} has no image")
        if key in references:
            raise InputError(f"{path}: row {row_number}: image {key!r} repeats; each image needs one reference")
        if answer_kind == "report":
            references[key] = cell(text)
        else:
            where = f"{path}: row {row_number}"
            labels = [label_files.parse_label_cell(cell(header.index(o.lower())), where) for o in CHEXPERT_OBSERVATIONS]
            references[key] = {o: None if math.isnan(v) else v for o, v in zip(CHEXPERT_OBSERVATIONS, labels)}
    return references


class _TailIndex:
    """Finds a reference image by its path as written, else by the longest path tail that names only one image."""

    def __init__(self, keys):
        self._keys = set(keys)
        self._by_tail = {}
        for key in keys:
            parts = PurePath(key).parts
            for n in range(1, len(parts) + 1):
                self._by_tail.setdefault(parts[-n:], []).append(key)

    def find(self, image: str):
        if image in self._keys:
            return image
        parts = PurePath(image).parts
        for n in range(len(parts), 0, -1):
            found = self._by_tail.get(parts[-n:], ())
            if len(found) == 1:
                return found[0]
        return None
