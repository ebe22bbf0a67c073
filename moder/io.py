"""Safe outputs: atomic writes that never replace what they did not write, and checked tensor files.

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
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

OWNER_FILE = ".moder-output"  # in every output directory: which stage wrote it
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]+(\.old)?\.tmp")
_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG}


class OutputError(RuntimeError):
    """An output cannot be written where it was asked for; the message names the path."""


class TensorFileError(ValueError):
    """A safetensors file is unreadable, truncated or holds non-finite values; the message names it."""


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


_METADATA_KEY = "moder"
_DIGEST_KEY = "sha256"  # inside the metadata: of the rest of the metadata and every tensor


def _content_digest(tensors: Iterator[tuple[str, torch.Tensor]], metadata_text: str) -> str:
    """sha256 over the metadata and each tensor's name, dtype, shape and bytes, in name order: any
    changed byte of a file written by `save_tensors` (a value, an offset, a mean) is caught on load."""
    digest = hashlib.sha256(metadata_text.encode())
    for name, tensor in tensors:
        digest.update(f"\0{name}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_tensors(path: Path | str, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """safetensors, written atomically, with `metadata` and a content digest as one sorted JSON string.

    One key because safetensors writes several metadata keys in a different order in every
    process, and DVC would then see a new file each time the same result is recomputed.
    Non-finite values are refused: nothing downstream could make sense of them.
    """
    if _DIGEST_KEY in metadata:
        raise ValueError(f"metadata key {_DIGEST_KEY!r} is reserved for the content digest")
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise TensorFileError(f"refusing to write {path}: tensor {name} has non-finite values")
    try:
        text = json.dumps(metadata, sort_keys=True, allow_nan=False)
    except ValueError:
        raise TensorFileError(f"refusing to write {path}: its metadata holds non-finite numbers") from None
    digest = _content_digest(iter(sorted(tensors.items())), text)
    with atomic_path(path) as temporary:
        save_file(
            {k: v.detach().contiguous() for k, v in tensors.items()},
            str(temporary),
            metadata={_METADATA_KEY: json.dumps({**metadata, _DIGEST_KEY: digest}, sort_keys=True)},
        )


def _read_metadata(path: Path | str) -> tuple[dict[str, Any] | None, str | None]:
    """The metadata written by `save_tensors` and its recorded digest (None, None for other files)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(_METADATA_KEY)
    except (SafetensorError, OSError) as error:
        raise TensorFileError(f"{path}: not a readable safetensors file ({error})") from None
    if raw is None:
        return None, None
    try:
        metadata = json.loads(raw)
    except ValueError as error:
        raise TensorFileError(f"{path}: its metadata is not valid JSON ({error})") from None
    if not isinstance(metadata, dict):
        raise TensorFileError(f"{path}: its metadata is not a JSON object")
    return metadata, metadata.pop(_DIGEST_KEY, None)


def load_metadata(path: Path | str) -> dict[str, Any] | None:
    """The metadata written by `save_tensors` (None when the file has none), without reading the
    tensors (so unverified: `verify_tensors` checks the file against its digest)."""
    return _read_metadata(path)[0]


def _check_digest(
    path: Path | str, tensors: Iterator[tuple[str, torch.Tensor]], metadata: dict[str, Any] | None, recorded: str | None
) -> None:
    if metadata is None:
        return  # not written by save_tensors (e.g. a checkpoint from elsewhere): nothing to compare
    if recorded is None:
        raise TensorFileError(f"{path}: no content digest in its metadata (not written by this version, or edited)")
    if _content_digest(tensors, json.dumps(metadata, sort_keys=True, allow_nan=False)) != recorded:
        raise TensorFileError(f"{path}: its contents do not match their digest (the file was damaged or edited)")


def verify_tensors(path: Path | str) -> None:
    """Check a file written by `save_tensors` against its content digest, one tensor in memory at a time."""
    metadata, recorded = _read_metadata(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            _check_digest(path, ((k, handle.get_tensor(k)) for k in sorted(handle.keys())), metadata, recorded)
    except (SafetensorError, OSError) as error:
        raise TensorFileError(f"{path}: not a readable safetensors file ({error})") from None


def load_tensors(path: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Tensors and the metadata written by `save_tensors` (None when the file has none), checked
    against the content digest; every floating-point tensor must be finite."""
    metadata, recorded = _read_metadata(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise TensorFileError(f"{path}: not a readable safetensors file ({error})") from None
    _check_digest(path, iter(sorted(tensors.items())), metadata, recorded)
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise TensorFileError(f"{path}: tensor {name} has non-finite values (the file is damaged)")
    return tensors, metadata
