"""Reading the label tables that datasets publish: CSV (optionally gzipped), any delimiter, with a line number
for every row so that an error can name the row at fault. Text is read by `files.read_text` (UTF-8, a byte-order
mark as some releases (BrixIA) carry dropped, errors naming the file and offset)."""

from pathlib import Path
from typing import Iterator

from cxrllava_jax import files
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
    names, records = files.read_csv_records(path, delimiter)
    missing = [c for c in columns if c not in names]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing}; the header is {names}")
    for line, row in records:
        yield f"{path.name} line {line}", row


def header(path: Path, delimiter: str = ",") -> list[str]:
    return files.read_csv_records(path, delimiter)[0]


def read_lines(path: Path) -> list[str]:
    """Non-empty stripped lines of a text list (e.g. NIH's train_val_list.txt)."""
    return [line.strip() for line in files.read_text(path).splitlines() if line.strip()]
