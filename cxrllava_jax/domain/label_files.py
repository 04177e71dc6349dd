"""Label files in the CheXpert labeler's formats, so its output, CheXbert's or ours can stand on either side.

Reports in: a CSV with one report per row (quoted when it holds commas or newlines), optionally under a one-cell
header naming the column (`Reports`, `Report Impression`, `Report`, `Text`).
Labels out: header `Reports,<14 observations in CHEXPERT_OBSERVATIONS order>`, values `1.0`, `0.0`, `-1.0`,
or an empty cell for not mentioned. The reader takes any column order and also CheXbert's output
(`Report Impression` text column, values `1`/`0`/`-1`), with an optional id column.
"""

import csv
import dataclasses
import math

import numpy as np

from cxrllava_jax import files
from cxrllava_jax.errors import InputError
from cxrllava_jax.domain.findings import CHEXPERT_OBSERVATIONS

REPORT_COLUMN = "Reports"
_TEXT_COLUMNS = ("reports", "report impression", "report", "text")
_ID_COLUMNS = ("id", "study_id", "path", "dicom_id")
_VALUE_TEXT = {1.0: "1.0", 0.0: "0.0", -1.0: "-1.0"}


@dataclasses.dataclass
class LabelTable:
    """Labels of n reports: `labels` is (n, 14) in CHEXPERT_OBSERVATIONS order, NaN for not mentioned."""

    labels: np.ndarray
    ids: list
    reports: list


def read_reports_csv(path) -> list:
    """The reports of a single-column CSV, one per row, so that outputs line up with the input row for row:
    empty lines are skipped (as the CheXpert labeler does), a row of only whitespace is an empty report, and a
    first row that is just a column name is a header, not a report.

    A row that an unquoted comma split into several cells is joined back with commas."""
    rows = [",".join(row) for row in csv_rows(path) if row]
    if rows and rows[0].strip().lower() in _TEXT_COLUMNS:
        rows = rows[1:]
    return rows


def csv_rows(path):
    """csv rows of a UTF-8 file (`files.read_csv`: errors name it), any field length."""
    return [row for _, row in files.read_csv(path)]


def write_labels_csv(path, reports, labels, ids=None) -> None:
    """The CheXpert labeler's output format; with `ids`, an `id` column comes first."""
    labels = np.asarray(labels, dtype=np.float64)
    with files.replaced_atomically(path, newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow((["id"] if ids is not None else []) + [REPORT_COLUMN, *CHEXPERT_OBSERVATIONS])
        for i, (report, row) in enumerate(zip(reports, labels)):
            cells = ["" if math.isnan(v) else _VALUE_TEXT[float(v)] for v in row]
            writer.writerow(([ids[i]] if ids is not None else []) + [report, *cells])


def read_labels_csv(path) -> LabelTable:
    """Reads our, the CheXpert labeler's or CheXbert's label CSV. Rows without an id column get ids "0", "1", ..."""
    rows = csv_rows(path)
    header = rows[0] if rows else []
    by_lower = {name.strip().lower(): i for i, name in enumerate(header)}
    missing = [o for o in CHEXPERT_OBSERVATIONS if o.lower() not in by_lower]
    if missing:
        raise InputError(f"{path}: label file lacks the columns {missing}")
    text_column = next((by_lower[c] for c in _TEXT_COLUMNS if c in by_lower), None)
    id_column = next((by_lower[c] for c in _ID_COLUMNS if c in by_lower), None)
    labels, ids, reports = [], [], []
    for i, row in enumerate(r for r in rows[1:] if r):
        cell = lambda column: row[column] if column is not None and column < len(row) else ""  # noqa: E731
        labels.append([parse_label_cell(cell(by_lower[o.lower()]), path, i) for o in CHEXPERT_OBSERVATIONS])
        ids.append(cell(id_column) if id_column is not None else str(i))
        reports.append(cell(text_column))
    return LabelTable(np.array(labels, dtype=np.float64).reshape(-1, 14), ids, reports)


def parse_label_cell(cell, where="", row=None) -> float:
    """'1.0', '1', '0', '-1', '' (not mentioned) -> float; anything else is an error naming `where` and `row`."""
    text = (cell or "").strip()
    if not text or text.lower() == "nan":
        return math.nan
    try:
        value = float(text)
    except ValueError:
        value = None
    if value not in _VALUE_TEXT:
        at = f"{where}: row {row + 1}" if row is not None else where
        raise InputError(f"{at}: label {cell!r} is not one of 1, 0, -1 or empty")
    return value
