"""Output files that are never lost or interleaved, and input files whose errors name them.

- `refuse_existing`: an output that exists is kept unless the caller was told to overwrite it (checked before
  any work, so a long run does not end in a refusal).
- `replaced_atomically`: a whole file is written beside its destination and renamed over it only once complete,
  so a crash, a kill or an error mid-way leaves the previous file as it was.
- `LockedAppender`: records that arrive one by one (reports of a batch) are appended as whole lines under an
  exclusive lock, so writers in several processes never interleave and a kill loses at most the line being
  written, never what came before.
- `read_text`, `read_csv`, `read_json`, `read_json_lines`: every text and table input is read here, so that each
  is UTF-8 (a byte-order mark dropped, gzip undone) and each error names the file and the byte offset or line.
- `printable`: a path as text that can be written anywhere (a file name that is not UTF-8 gets \\x escapes).
"""

import contextlib
import csv
import fcntl
import gzip
import io
import json
import os
import sys
from pathlib import Path

from cxrllava_jax.errors import InputError, OutputExistsError


def refuse_existing(path, overwrite: bool, flag: str = "--overwrite"):
    """Raises OutputExistsError if `path` exists (a non-empty file or directory) and `overwrite` is false."""
    path = Path(path)
    if overwrite or not path.exists():
        return
    if path.is_file() and path.stat().st_size == 0:
        return
    if path.is_dir() and not any(path.iterdir()):
        return
    raise OutputExistsError(f"{path} exists; pass {flag} to replace it (or choose another output)")


@contextlib.contextmanager
def replaced_atomically(path, mode: str = "w", **open_args):
    """Yields a file opened beside `path`; when the block ends without error it is flushed, synced and renamed
    onto `path` (an atomic replace on POSIX). On error the partial file is removed and `path` is untouched."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, "Is a directory; an output file was expected", str(path))
    if "b" not in mode:
        open_args.setdefault("encoding", "utf-8")
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(temporary, mode, **open_args) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomically(path, text: str):
    with replaced_atomically(path) as f:
        f.write(text)


def _replace(temporary: Path, path: Path):
    os.replace(temporary, path)


class LockedAppender:
    """JSON records appended to a file, one line each, under an exclusive `fcntl` lock held for the write."""

    def __init__(self, path):
        self.path = Path(path)
        if self.path.is_dir():
            raise IsADirectoryError(21, "Is a directory; an output file was expected", str(self.path))
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: dict):
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            written = 0
            while written < len(data):  # O_APPEND: each write lands at the end, after any other process's line
                written += os.write(self._fd, data[written:])
            os.fsync(self._fd)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_text(path) -> str:
    """A UTF-8 text file (gzipped if its name ends in .gz); a byte-order mark is dropped, other bytes that are
    not UTF-8 raise an InputError naming the file and the offset."""
    path = Path(path)
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as error:
            raise InputError(f"{printable(path)}: not a readable gzip file ({error})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        offset = error.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data[:offset].count(b"\n") + 1
        raise InputError(f"{printable(path)}: not UTF-8 text (byte {data[offset]:#04x} at offset {offset}, line "
                         f"{line}); save the file as UTF-8") from None


# A line no text holds: a quote left open swallows it into a field, which shows where the quote was opened.
_END_OF_FILE = "\uffff end of file \uffff"


def read_csv(path, delimiter: str = ",") -> list[tuple[int, list[str]]]:
    """(line number, cells) for every row of a CSV file read by `read_text`, fields of any length. A quote that is
    never closed (it would swallow the rest of the file into one field) is an InputError naming its line."""
    csv.field_size_limit(sys.maxsize)
    lines = list(io.StringIO(read_text(path), newline=""))  # only \n, \r\n and \r end a line, as for csv
    if lines and not lines[-1].endswith(("\n", "\r")):
        lines[-1] += "\n"
    reader = csv.reader([*lines, _END_OF_FILE + "\n"], delimiter=delimiter)
    rows, first_line = [], 1
    try:
        for row in reader:
            if row == [_END_OF_FILE]:
                break
            if row and _END_OF_FILE in row[-1]:
                raise InputError(f"{printable(path)}: line {first_line}: a quoted field opened on this line is never "
                                 "closed (an unmatched '\"'), so it would hold the rest of the file")
            rows.append((first_line, row))
            first_line = reader.line_num + 1
    except csv.Error as error:
        raise InputError(f"{printable(path)}: line {reader.line_num}: not a readable CSV ({error})") from None
    return rows


def read_csv_records(path, delimiter: str = ",") -> tuple[list[str], list[tuple[int, dict]]]:
    """(header, [(line number, {column: cell})]) as csv.DictReader gives them: blank lines skipped, a short row's
    missing cells None."""
    rows = [(line, cells) for line, cells in read_csv(path, delimiter) if cells]
    header = rows[0][1] if rows else []
    return header, [(line, {name: cells[i] if i < len(cells) else None for i, name in enumerate(header)})
                    for line, cells in rows[1:]]


def printable(path) -> str:
    """`path` as text that encodes as UTF-8: bytes of a name that is not UTF-8 are shown as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def read_json(path):
    path = Path(path)
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise InputError(f"{printable(path)}: line {error.lineno} column {error.colno}: not valid JSON ({error.msg})") from None


def read_json_lines(path) -> list[tuple[int, object]]:
    """(line number, value) for every non-blank line of a JSON-lines file; a bad line is named by number."""
    path = Path(path)
    values = []
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            values.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            raise InputError(f"{printable(path)}:{number}: not valid JSON ({error.msg} at column {error.colno})") from None
    return values
