"""A content-addressed store for the files stages write, on any fsspec filesystem.

Layout under the store's root (a local directory, `out/store` by default, or any fsspec URL such
as `s3://bucket/moder-store` that every worker can reach):

    blobs/<sha256 hex>    a file's bytes, named by their SHA-256
    records/<key>.json    a stage instance's cached output: {"files": {path: sha256}, "digest": ...}

An artifact travels between tasks as an `ArtifactRecord` (paths and digests, a few hundred bytes),
never as file contents. Everything read from the store is untrusted: records are parsed with
`json.loads` only and checked field by field (digests are 64 hex digits, paths stay below the
artifact's root, the overall digest matches), and every blob is hashed when read and refused
unless it matches its name. A tampered or damaged record is a cache miss with a warning naming it, never
code run nor a foreign file used. Writes go to a temporary name and are moved into place, so readers never
see half a file where the filesystem's move is atomic (local, POSIX). `python -m flows.store prune` removes
records unused for a while and the blobs no record names.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath

from fsspec.core import url_to_fs

from moder.errors import UserError
from moder.io import atomic_path, file_digest, is_temporary

DEFAULT_STORE = "out/store"


_SHA256 = re.compile(r"[0-9a-f]{64}")


class StoreError(UserError):
    """Something in the store fails verification (tampered, corrupt or missing) or cannot be written; the
    message names the file."""


def files_below(path: Path) -> list[Path]:
    """`path` itself if it is a file, else every file below it; sorted, caches and the temporaries
    of interrupted writes left out (as DVC leaves them out, through .dvcignore)."""
    candidates = [path] if path.is_file() else path.rglob("*")
    return sorted(
        f
        for f in candidates
        if f.is_file() and "__pycache__" not in f.parts and not any(is_temporary(part) for part in f.parts)
    )


def _checked_name(name: str) -> str:
    """A relative POSIX path with no `..`, `.` or empty parts: it cannot leave the directory it is unpacked in."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or path.as_posix() != name or "\\" in name:
        raise ValueError(f"path {name!r} is not a plain relative path inside the artifact")
    return name


def _checked_digest(digest: str) -> str:
    # A digest names a blob file, so anything but 64 hex digits could point outside blobs/.
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise ValueError(f"{digest!r} is not a SHA-256 hex digest")
    return digest


def digest_files(files: dict[str, Path]) -> ArtifactRecord:
    """The record of these files under their names (relative POSIX paths), without storing them."""
    return ArtifactRecord.of({name: file_digest(file) for name, file in files.items()})


@dataclass(frozen=True)
class ArtifactRecord:
    """The files one stage instance wrote, by path relative to its output root, with one digest over all of them."""

    files: dict[str, str]  # relative path -> SHA-256 of the file's bytes
    digest: str

    @classmethod
    def of(cls, files: dict[str, str]) -> ArtifactRecord:
        files = {_checked_name(name): _checked_digest(files[name]) for name in sorted(files)}
        digest = hashlib.sha256()
        for name, content in files.items():
            digest.update(name.encode() + b"\0" + bytes.fromhex(content))
        return cls(files, digest.hexdigest())

    def to_json(self) -> bytes:
        return json.dumps({"files": self.files, "digest": self.digest}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, content: bytes, source: str) -> ArtifactRecord:
        """Parse and check a stored record; anything else (a pickle, another program's JSON) is refused."""
        try:
            data = json.loads(content)
            if not isinstance(data, dict) or set(data) != {"files", "digest"} or not isinstance(data["files"], dict):
                raise ValueError("expected a JSON object with exactly the keys 'files' and 'digest'")
            record = cls.of(data["files"])
            if record.digest != data["digest"]:
                raise ValueError("its digest does not match the files it lists")
        except ValueError as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors too
            raise StoreError(f"{source} is not a valid artifact record ({error}); delete it to recompute") from None
        return record


class Store:
    """Blobs and records under one fsspec URL; see the module docstring for the layout. A cache and a channel:
    what cannot be read back is a miss (one warning line, then the stage runs), what cannot be written is a
    StoreError naming the store (the flow passes every artifact through it)."""

    def __init__(self, url: str, warn: Callable[[str], object] = print) -> None:
        self.fs, self.root = url_to_fs(url)
        self.warn = warn
        try:
            for folder in ("blobs", "records"):
                self.fs.makedirs(f"{self.root}/{folder}", exist_ok=True)
        except OSError as error:
            raise StoreError(f"store {url} cannot be created ({error}); pass another --store") from None

    @property
    def url(self) -> str:
        """The store's absolute URL, the same from every process (a relative local path is resolved here)."""
        return self.fs.unstrip_protocol(self.root)

    def blob(self, digest: str) -> str:
        return f"{self.root}/blobs/{digest}"

    def record(self, key: str) -> str:
        return f"{self.root}/records/{key}.json"

    def put_files(self, files: dict[str, Path]) -> ArtifactRecord:
        """Store each file under its name (a relative POSIX path in the artifact); identical content is stored
        once. A write that fails (disk full, read-only store) leaves no temporary behind."""
        record = digest_files(files)
        for name, digest in record.files.items():
            if not self.fs.exists(self.blob(digest)):
                self._write(self.blob(digest), partial(self.fs.put_file, str(files[name])))
        return record

    def _write(self, target: str, write: Callable[[str], object]) -> None:
        temporary = f"{target}.{uuid.uuid4().hex}.tmp"
        try:
            write(temporary)
            self.fs.mv(temporary, target)
        except OSError as error:
            if self.fs.exists(temporary):
                self.fs.rm_file(temporary)
            raise StoreError(f"cannot write {target} into the store ({error.strerror or error})") from None

    def materialise(self, record: ArtifactRecord, target: Path, label: str) -> None:
        """Copy `record`'s files below `target`, each verified before it takes its final name."""
        for name, digest in record.files.items():
            with atomic_path(target / name) as temporary:
                try:
                    self.fs.get_file(self.blob(digest), str(temporary))
                except FileNotFoundError:
                    raise StoreError(f"blob {self.blob(digest)} of {label}:{name} is missing") from None
                with temporary.open("rb") as handle:
                    self._check(file_digest(handle), digest, label, name)

    def _check(self, actual: str, digest: str, label: str, name: str) -> None:
        if actual != digest:
            raise StoreError(
                f"blob {self.blob(digest)} does not match its digest (it holds {actual[:12]}...); "
                f"it is {label}:{name}; delete it and the records naming it to recompute"
            )

    def lookup(self, key: str) -> ArtifactRecord | None:
        """The record cached under `key`, every blob verified; None when there is none. A record that cannot be
        trusted (not a valid record, a blob missing or not matching its digest, the store unreadable) is a miss
        with one warning naming the file: nothing from it is used, a blob that does not match its name is
        removed (it can never be right), and the stage's new record replaces it."""
        path = self.record(key)
        try:
            record = ArtifactRecord.from_json(self.fs.cat_file(path), path)
            for name, digest in record.files.items():
                with self.fs.open(self.blob(digest), "rb") as handle:
                    actual = file_digest(handle)
                if actual != digest:
                    self.fs.rm_file(self.blob(digest))
                    raise StoreError(f"blob {self.blob(digest)} of {path}:{name} does not match its digest (removed)")
        except FileNotFoundError as error:
            if self.fs.exists(path):  # the record is there, a blob it names is not
                self.warn(f"warning: store miss: a blob of {path} is missing ({error.filename or error}); recomputing")
            return None
        except (StoreError, OSError) as error:
            self.warn(f"warning: store miss: {error}; recomputing")
            return None
        if self.fs.protocol in ("file", ("file", "local")):  # when it was last used, for prune
            Path(path).touch()
        return record

    def save(self, key: str, record: ArtifactRecord) -> None:
        self._write(self.record(key), lambda temporary: self.fs.pipe_file(temporary, record.to_json()))

    def prune(self, older_than_days: float) -> tuple[int, int, int]:
        """Remove the records not used for `older_than_days` days, then every blob no record names and every
        temporary of an interrupted write older than a day: (records, blobs, bytes) removed."""
        now = time.time()
        records = self.fs.find(f"{self.root}/records")
        removed = [r for r in records if now - self._modified(r) > older_than_days * 86400]
        for record in removed:
            self.fs.rm_file(record)
        named: set[str] = set()
        for record in set(records) - set(removed):
            try:
                named |= set(ArtifactRecord.from_json(self.fs.cat_file(record), record).files.values())
            except StoreError:
                continue  # not a record of ours: its blobs are not kept for it
        blobs, size = 0, 0
        for blob in self.fs.find(f"{self.root}/blobs"):
            name = blob.rsplit("/", 1)[-1]
            stale = name.endswith(".tmp") and now - self._modified(blob) > 86400
            if stale or (not name.endswith(".tmp") and name not in named):
                size += self.fs.size(blob)
                self.fs.rm_file(blob)
                blobs += 1
        return len(removed), blobs, size

    def _modified(self, path: str) -> float:
        modified = self.fs.modified(path)
        return modified.timestamp() if hasattr(modified, "timestamp") else float(modified)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Prune the content-addressed store of the Prefect flow.")
    parser.add_argument("command", choices=["prune"])
    parser.add_argument("--store", default=DEFAULT_STORE, help=f"a path or fsspec URL (default: {DEFAULT_STORE})")
    parser.add_argument("--older-than", type=float, default=30.0, help="days since a record was last used (30)")
    args = parser.parse_args()
    try:
        records, blobs, size = Store(args.store).prune(args.older_than)
    except StoreError as error:
        raise SystemExit(f"error: {error}") from None
    unused = f"unused for {args.older_than:g} days"
    print(f"{args.store}: removed {records} record(s) {unused}, {blobs} blob(s) no record names, {size:,} bytes")


if __name__ == "__main__":
    main()
