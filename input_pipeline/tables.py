"""Reading the label tables that datasets publish: CSV (optionally gzipped), any delimiter, with a line number
for every row so that an error can name the row at fault."""

import csv
import gzip
from pathlib import Path
from typing import Iterator

from cxrllava_jax.errors import InputError


def find(root: Path, *names: str) -> Path | None:
    """The first of `names` (or its .gz) that exists under `root`."""
    for name in names:
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def require(root: Path, *names: str, dataset: str) -> Path:
    path = find(root, *names)
    if path is None:
        raise InputError(f"{root}: none of {', '.join(names)} (or .gz) found; is this a {dataset} directory?")
    return path


def rows(path: Path, columns=(), delimiter: str = ",") -> Iterator[tuple[str, dict]]:
    """(origin, row) for every data row; origin is 'FILE line N'. Raises if a column in `columns` is absent."""
    with _open(path) as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        missing = [c for c in columns if c not in (reader.fieldnames or ())]
        if missing:
            raise InputError(f"{path}: missing column(s) {missing}; the header is {reader.fieldnames}")
        for row in reader:
            yield f"{path.name} line {reader.line_num}", row


def header(path: Path, delimiter: str = ",") -> list[str]:
    with _open(path) as f:
        return next(csv.reader(f, delimiter=delimiter), [])


def _open(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    # utf-8-sig: some releases (BrixIA) start with a byte-order mark that would otherwise stick to the first name.
    return opener(path, "rt", newline="", encoding="utf-8-sig")


def read_lines(path: Path) -> list[str]:
    """Non-empty stripped lines of a text list (e.g. NIH's train_val_list.txt)."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]
