"""Output files that are never lost or interleaved, and input files whose errors name them.

- `refuse_existing`: an output that exists is kept unless the caller was told to overwrite it (checked before
  any work, so a long run does not end in a refusal).
- `replaced_atomically`: a whole file is written beside its destination and renamed over it only once complete,
  so a crash, a kill or an error mid-way leaves the previous file as it was.
- `LockedAppender`: records that arrive one by one (reports of a batch) are appended as whole lines under an
  exclusive lock, so writers in several processes never interleave and a kill loses at most the line being
  written, never what came before.
- `read_json`, `read_text`, `read_json_lines`: parse errors name the file (and line).
"""

import contextlib
import fcntl
import json
import os
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
    path.parent.mkdir(parents=True, exist_ok=True)  # an output's folder is made for it, as for every output
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
        self.path.parent.mkdir(parents=True, exist_ok=True)
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
    """A UTF-8 text file; other bytes raise an InputError naming the file and the offset."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not UTF-8 text (byte {data[error.start]:#04x} at offset {error.start}); "
                         "save the file as UTF-8") from None


def read_json(path):
    path = Path(path)
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: line {error.lineno} column {error.colno}: not valid JSON ({error.msg})") from None


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
            raise InputError(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})") from None
    return values
