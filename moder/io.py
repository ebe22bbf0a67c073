"""Safe outputs: atomic writes that never replace what they did not write; the one file digest.

A write is built under a temporary name beside its target and renamed onto it only when complete,
so an interrupted stage leaves the old output (or none), never half of one. Temporary names are
`.<target>.<pid>-<random>.tmp`: hidden from DVC by `.dvcignore`, and removed by the next write of
the same target once the process that made them is gone. A directory output carries a marker file
naming what wrote it; a write refuses to replace a directory that is not empty and not its own, so
a wrong `--out` can never delete a user's data.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import BinaryIO

from moder.errors import UserError

OWNER_FILE = ".moder-output"  # in every output directory: which stage wrote it
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]+(\.old)?\.tmp")
_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG}


class OutputError(UserError, RuntimeError):
    """An output cannot be written where it was asked for; the message names the path."""


def is_temporary(name: str) -> bool:
    """Whether a file name is one of our temporaries: never part of an output."""
    return _TEMPORARY.fullmatch(name) is not None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temporaries(path: Path) -> None:
    """Temporaries of `path` left by a process that no longer runs (a killed stage)."""
    if not path.parent.is_dir():
        return
    for candidate in path.parent.iterdir():
        match = _TEMPORARY.fullmatch(candidate.name)
        if match and match["name"] == path.name and not _alive(int(match["pid"])):
            shutil.rmtree(candidate) if candidate.is_dir() and not candidate.is_symlink() else candidate.unlink()


def _temporary_name(path: Path, suffix: str = "") -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{suffix}.tmp")


def _prepare(path: Path) -> None:
    if path.is_symlink():
        raise OutputError(f"refusing to write {path}: it is a symbolic link")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"could not create {path.parent}: {error.strerror}") from None
    _remove_stale_temporaries(path)


def _is_disk_error(error: OSError) -> bool:
    return error.errno in _DISK_ERRORS or "No space left" in str(error)


@contextmanager
def _disk_errors_name(path: Path) -> Iterator[None]:
    """A full disk or read-only folder becomes one line naming the output being written."""
    try:
        yield
    except OSError as error:
        if not _is_disk_error(error):
            raise
        raise OutputError(f"could not write {path}: {error.strerror or error}") from None


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`.

    The temporary is created with the process umask (files are not made private), and `path`
    must not be a directory: a file output never replaces a folder.
    """
    with atomic_files([Path(path)]) as (temporary,):
        yield temporary


@contextmanager
def atomic_files(paths: list[Path]) -> Iterator[list[Path]]:
    """Temporaries for several files, renamed onto their targets only once every one is written:
    a failure while writing any of them leaves all the old files in place."""
    with ExitStack() as stack:
        temporaries = [stack.enter_context(_deferred(Path(path))) for path in paths]
        yield [temporary for temporary, _ in temporaries]
        for temporary, target in temporaries:
            os.replace(temporary, target)


@contextmanager
def _deferred(path: Path) -> Iterator[tuple[Path, Path]]:
    """Like `atomic_path`, but the rename is left to the caller."""
    _prepare(path)
    if path.is_dir():
        raise OutputError(f"refusing to write the file {path}: a directory is there")
    temporary = _temporary_name(path)
    try:
        with _disk_errors_name(path):
            os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            yield temporary, path
    finally:
        temporary.unlink(missing_ok=True)


def _owner(directory: Path) -> str | None:
    marker = directory / OWNER_FILE
    try:
        return json.loads(marker.read_text())["written_by"] if marker.is_file() else None
    except (ValueError, KeyError, TypeError):
        return None


@contextmanager
def atomic_directory(path: Path | str, owner: str) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path` whole.

    `owner` names what writes this kind of output (e.g. "extract"); it is recorded in the
    directory, and an existing `path` is only replaced when it is empty or was written by the
    same owner. Anything else (a user's folder, a parent of several outputs, the working
    directory) is refused and left untouched.
    """
    path = Path(path)
    _prepare(path)
    if path.exists():
        if not path.is_dir():
            raise OutputError(f"refusing to replace {path}: it is a file, not a directory written by {owner}")
        if any(path.iterdir()) and _owner(path) != owner:
            raise OutputError(
                f"refusing to replace {path}: it is not empty and was not written by {owner} "
                f"(no {OWNER_FILE} of {owner} in it); choose another --out"
            )
    temporary = _temporary_name(path)
    with _disk_errors_name(path):
        temporary.mkdir(0o777)  # the umask applies, as for any directory the user makes
    try:
        with _disk_errors_name(path):
            (temporary / OWNER_FILE).write_text(json.dumps({"written_by": owner}) + "\n")
            yield temporary
            old = _temporary_name(path, ".old")
            if path.exists():
                os.replace(path, old)
            os.replace(temporary, path)
            if old.exists():
                shutil.rmtree(old)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary)


def csv_text(rows: list[list]) -> str:
    """CSV by the csv module, so names with commas, quotes or newlines stay one field."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def file_digest(source: Path | BinaryIO) -> str:
    """The SHA-256 (hex) of a file's bytes, read in chunks: a path, or a binary handle already open (a store's)."""
    digest = hashlib.sha256()
    with source.open("rb") if isinstance(source, Path) else nullcontext(source) as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()
