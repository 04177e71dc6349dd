"""Output files that are never lost or interleaved, and input files whose errors name them.

One protocol for everything a command writes: the new result is built beside the old one (a hidden
`.NAME.PID.partial` sibling, on the same filesystem) and swapped into place only when complete, so a crash, a kill,
a full disk or an error mid-way leaves the previous output as it was, and `--overwrite` never deletes anything
before its replacement exists.

- `refuse_existing`: an output that exists is kept unless the caller was told to overwrite it (checked before
  any work, so a long run does not end in a refusal).
- `replaced_atomically`: one file, renamed over its destination once complete.
- `staged_directory`: a set of outputs that belong together (a dataset, an export, an evaluation's tables and
  label files), written into a staging directory and swapped with the destination in one rename; entries of the
  old directory that the command does not write are carried over (hard links), never deleted.
- `record_appender`: records that arrive one by one (reports of a batch) appended as whole lines under an
  exclusive lock (`LockedAppender`), so writers in several processes never interleave and a kill loses at most
  the line being written; with `replace`, into a file beside that replaces the old one at the end.
- `read_text`, `read_csv`, `read_json`, `read_json_lines`: every text and table input is read here, so that each
  is UTF-8 (a byte-order mark dropped, gzip undone) and each error names the file and the byte offset or line.
- `printable`: a path as text that can be written anywhere (a file name that is not UTF-8 gets \\x escapes).

A symlinked destination is followed: the file or directory it points to is replaced and the link kept. An
OSError that names no file (ENOSPC, EDQUOT, EIO from a write) is re-raised naming the output and saying that the
old one was kept.
"""

import contextlib
import csv
import ctypes
import errno
import fcntl
import fnmatch
import glob
import gzip
import io
import json
import os
import shutil
import sys
from pathlib import Path

from cxrllava_jax.errors import InputError, OutputExistsError

EVERYTHING = ("*",)


def refuse_existing(path, overwrite: bool, flag: str = "--overwrite", owns=None):
    """Raises OutputExistsError if `path` exists (a non-empty file or directory) and `overwrite` is false, and
    PermissionError if nothing can be written where it would go.

    Without `owns`, `path` is an output file (a directory there is refused); with `owns` (name patterns), an output
    directory (a file there is refused) of which only the entries it would replace (those matching `owns`) count."""
    path = _followed(path)
    folder = next((p for p in path.parents if p.exists()), path)
    if not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory, so no output can be written under it", str(folder))
    if not os.access(folder, os.W_OK | os.X_OK):  # found now, not after hours of work
        raise PermissionError(errno.EACCES, "cannot write there (a read-only filesystem, or no permission)",
                              str(folder))
    if owns is None and path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "Is a directory; an output file was expected", str(path))
    if owns is not None and path.exists() and not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory; an output directory was expected", str(path))
    if overwrite or not path.exists():
        return
    if path.is_file() and path.stat().st_size == 0:
        return
    if path.is_dir():
        mine = _owned(path, owns)
        if not mine:
            return
        if owns != EVERYTHING:
            raise OutputExistsError(f"{path} already holds {', '.join(sorted(mine)[:3])}"
                                    f"{' ...' if len(mine) > 3 else ''}; pass {flag} to replace them "
                                    "(or choose another output)")
    raise OutputExistsError(f"{path} exists; pass {flag} to replace it (or choose another output)")


@contextlib.contextmanager
def replaced_atomically(path, mode: str = "w", **open_args):
    """Yields a file opened beside `path`; when the block ends without error it is flushed, synced and renamed
    onto `path` (an atomic replace on POSIX). On error the partial file is removed and `path` is untouched."""
    path = _followed(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "Is a directory; an output file was expected", str(path))
    if "b" not in mode:
        open_args.setdefault("encoding", "utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(path.parent, path.name)
    temporary = _staging_name(path)
    try:
        with _naming_output(path, temporary):
            with open(temporary, mode, **open_args) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            _replace(temporary, path)
    finally:
        _discard(temporary)


def write_text_atomically(path, text: str):
    with replaced_atomically(path) as f:
        f.write(text)


def _replace(temporary: Path, path: Path):
    if path.exists():  # the new file keeps the permissions given to the old one
        shutil.copymode(path, temporary)
    os.replace(temporary, path)


@contextlib.contextmanager
def staged_directory(path, overwrite: bool, flag: str = "--overwrite", owns=EVERYTHING):
    """Yields an empty directory beside `path` for a set of outputs that belong together; when the block ends
    without error it takes `path`'s place in one step, so readers see the old set or the new one, never a mix.

    `owns`: name patterns (fnmatch) of the entries the command writes. Existing ones are refused unless
    `overwrite`; entries of the old directory that match none are carried into the new one (hard links, so no
    data is copied and nothing written to them), so replacing a dataset or an evaluation never deletes a file
    the user keeps beside it. A killed run's staging directory is removed by the next run into `path`.

    A mount point (a container's volume, a cluster's scratch disk) cannot be renamed: there the staging directory
    is made inside it and its entries are swapped in one by one, each atomically."""
    path = _followed(path)
    refuse_existing(path, overwrite, flag, owns)
    if Path.cwd() == path or path in Path.cwd().parents:  # the swap would leave the shell in a removed directory
        raise OutputExistsError(f"{path} is the current directory or holds it; run the command from elsewhere")
    path.parent.mkdir(parents=True, exist_ok=True)
    mount_point = os.path.ismount(path)
    staging = _staging_name(path, inside=mount_point)
    _remove_abandoned(staging.parent, path.name)
    try:
        with _naming_output(path, staging):
            staging.mkdir()
            yield staging
            if mount_point:
                _swap_entries(staging, path, owns)
            else:
                if path.exists():
                    _carry_over(path, staging, owns)
                _swap_in(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # the old directory after a swap, the partial one after a failure


def _swap_in(staging: Path, path: Path):
    """Puts `staging` at `path`; an existing `path` ends up at `staging` (removed by the caller). Linux swaps the two
    in one atomic step (renameat2 RENAME_EXCHANGE); elsewhere the old one is renamed aside first."""
    if not (path.exists() or path.is_symlink()):
        os.rename(staging, path)
        return
    if _exchange(staging, path):
        return
    aside = path.with_name(f".{path.name}.{os.getpid()}.replaced")
    os.rename(path, aside)
    os.rename(staging, path)
    os.rename(aside, staging)


def _swap_entries(staging: Path, path: Path, owns):
    """Each entry of `staging` put in `path`; the entries of `path` it replaces, and owned ones it did not write
    anew, end up in `staging` (removed by the caller)."""
    written = {entry.name for entry in staging.iterdir()}
    for name in written:
        _swap_in(staging / name, path / name)
    for name in set(_owned(path, owns)) - written:
        os.rename(path / name, staging / name)


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two paths atomically where the kernel and filesystem can (True), else leaves both as they were."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _owned(directory: Path, owns) -> list[str]:
    """The entries of `directory` matching `owns` (never a staging directory of ours)."""
    return [entry.name for entry in directory.iterdir()
            if any(fnmatch.fnmatch(entry.name, p) for p in owns) and not _is_staging(entry.name)]


def _carry_over(old: Path, new: Path, owns):
    """Entries of `old` the command does not own, and that it did not write anew, linked into `new`."""
    for entry in old.iterdir():
        if any(fnmatch.fnmatch(entry.name, p) for p in owns) or (new / entry.name).exists() or _is_staging(entry.name):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), new / entry.name)
        elif entry.is_dir():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, new / entry.name)


def _link_or_copy(source, destination):
    try:
        os.link(source, destination)
    except OSError:  # a filesystem without hard links
        shutil.copy2(source, destination)


def _followed(path) -> Path:
    """The output a path names: a symlink's target (replacing the link would leave what it points to stale)."""
    path = Path(os.path.abspath(path))
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _staging_name(path: Path, inside: bool = False) -> Path:
    """`.NAME.PID.partial` beside `path` (or, `inside`, in it): on its filesystem, hidden, and this process's."""
    return (path if inside else path.parent) / f".{path.name}.{os.getpid()}.partial"


def _discard(temporary: Path):
    """Removes a staging file if it is there; a failure to (a read-only filesystem) never hides the real error."""
    with contextlib.suppress(OSError):
        temporary.unlink(missing_ok=True)


def _is_staging(name: str) -> bool:
    return name.startswith(".") and name.endswith(".partial")


def _remove_abandoned(folder: Path, name: str):
    """Staging files and directories for `name` in `folder` whose process is gone (killed mid-write)."""
    for staging in folder.glob(f".{glob.escape(name)}.*.partial"):
        pid = staging.name[len(name) + 2:-len(".partial")]
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
            shutil.rmtree(staging, ignore_errors=True) if staging.is_dir() else staging.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _naming_output(path: Path, staging: Path):
    """An OSError about no file or about the staging copy (a full disk, a quota, an I/O error) names `path`."""
    try:
        yield
    except OSError as error:
        if error.filename is not None and not str(error.filename).startswith(str(staging)):
            raise
        kept = "the earlier one is kept as it was" if path.exists() else "nothing was written there"
        raise OSError(error.errno, f"{error.strerror or error} while writing it; {kept}", str(path)) from error


class LockedAppender:
    """JSON records appended to a file, one line each, under an exclusive `fcntl` lock held for the write.

    `skip_recorded`: a function record -> key; a record whose key is already in the file (written before, or
    meanwhile by another process sharing it) is not written again (`write` returns False)."""

    def __init__(self, path, skip_recorded=None):
        self.path = Path(path)
        if self.path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "Is a directory; an output file was expected", str(self.path))
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        self._key, self._recorded, self._read_to = skip_recorded, set(), 0

    def write(self, record: dict) -> bool:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            if self._key is not None:
                self._read_new_records()
                if self._key(record) in self._recorded:
                    return False
            end = os.fstat(self._fd).st_size
            if end and os.pread(self._fd, 1, end - 1) != b"\n":  # a line cut off by a kill stays a line of its own
                data = b"\n" + data
            try:
                written = 0
                while written < len(data):  # O_APPEND: each write lands at the end, after any other process's line
                    written += os.write(self._fd, data[written:])
                os.fsync(self._fd)
            except OSError as error:  # e.g. the disk filled mid-line: take the partial line back
                os.ftruncate(self._fd, end)
                kept = "the records before it are kept"
                raise OSError(error.errno, f"{error.strerror or error} while appending a record; {kept}",
                              str(self.path)) from error
            if self._key is not None:
                self._recorded.add(self._key(record))
            return True
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def recorded(self) -> set:
        """The keys of the records in the file now (with `skip_recorded`)."""
        fcntl.flock(self._fd, fcntl.LOCK_SH)
        try:
            self._read_new_records()
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        return set(self._recorded)

    def _read_new_records(self):
        end = os.fstat(self._fd).st_size
        if end <= self._read_to:
            return
        data = os.pread(self._fd, end - self._read_to, self._read_to)
        whole = data[:data.rfind(b"\n") + 1]  # a last line without its newline is being written, or was cut off
        for line in whole.splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line cut off by a kill: not a record
                continue
            key = self._key(record) if isinstance(record, dict) else None
            if key is not None:
                self._recorded.add(key)
        self._read_to += len(whole)

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@contextlib.contextmanager
def record_appender(path, replace: bool = False, skip_recorded=None):
    """A `LockedAppender` on `path`; with `replace`, on a new file beside it that takes `path`'s place when the
    block ends without error (a killed or failed run leaves the old file whole)."""
    path = _followed(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not replace:
        with LockedAppender(path, skip_recorded) as out:
            yield out
        return
    _remove_abandoned(path.parent, path.name)
    temporary = _staging_name(path)
    try:
        with _naming_output(path, temporary):
            with LockedAppender(temporary, skip_recorded) as out:
                yield out
            _replace(temporary, path)
    finally:
        _discard(temporary)


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
