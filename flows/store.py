"""A content-addressed store for the files stages write, on any fsspec filesystem.

Layout under the store's root (a local directory, `out/store` by default, or any fsspec URL such
as `s3://bucket/moder-store` that every worker can reach):

    blobs/<sha256 hex>    a file's bytes, named by their SHA-256
    records/<key>.json    a stage instance's cached output: {"files": {path: sha256}, "digest": ...}

An artifact travels between tasks as an `ArtifactRecord` (paths and digests, a few hundred bytes),
never as file contents. Everything read from the store is untrusted: records are parsed with
`json.loads` only and checked field by field (digests are 64 hex digits, paths stay below the
artifact's root, the overall digest matches), and every blob is hashed when read and refused
unless it matches its name. A tampered store can therefore make a run fail with an error naming
the file, but cannot make it run code. Writes go to a temporary name and are moved into place,
so readers never see half a file where the filesystem's move is atomic (local, POSIX).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from fsspec.core import url_to_fs

from moder.io import atomic_path, is_temporary

DEFAULT_STORE = "out/store"


def project_store() -> str:
    """The store of the DVC project a stage runs in: DEFAULT_STORE below DVC_ROOT, which DVC sets for every
    stage (to the workspace's root also for queued experiments, which run in copies), else below here."""
    return str(Path(os.environ.get("DVC_ROOT", ".")) / DEFAULT_STORE)


_SHA256 = re.compile(r"[0-9a-f]{64}")


class StoreError(Exception):
    """Something in the store fails verification (tampered, corrupt or missing); the message names the file."""


def files_below(path: Path) -> list[Path]:
    """`path` itself if it is a file, else every file below it; sorted, caches and the temporaries
    of interrupted writes left out (as DVC leaves them out, through .dvcignore)."""
    candidates = [path] if path.is_file() else path.rglob("*")
    return sorted(
        f
        for f in candidates
        if f.is_file() and "__pycache__" not in f.parts and not any(is_temporary(part) for part in f.parts)
    )


def _sha256(handle: Any) -> str:
    return hashlib.file_digest(handle, "sha256").hexdigest()


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
    digests = {}
    for name, file in files.items():
        with file.open("rb") as handle:
            digests[name] = _sha256(handle)
    return ArtifactRecord.of(digests)


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

    def only(self, path: str) -> ArtifactRecord:
        """The record of one of these files (as dvc.yaml depends on one file of a stage's output directory)."""
        if path not in self.files:
            raise StoreError(f"no {path} among the files of this record ({', '.join(sorted(self.files))})")
        return ArtifactRecord.of({path: self.files[path]})

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
    """Blobs and records under one fsspec URL; see the module docstring for the layout."""

    def __init__(self, url: str) -> None:
        self.fs, self.root = url_to_fs(url)
        for folder in ("blobs", "records"):
            self.fs.makedirs(f"{self.root}/{folder}", exist_ok=True)

    @property
    def url(self) -> str:
        """The store's absolute URL, the same from every process (a relative local path is resolved here)."""
        return self.fs.unstrip_protocol(self.root)

    def blob(self, digest: str) -> str:
        return f"{self.root}/blobs/{digest}"

    def record(self, key: str) -> str:
        return f"{self.root}/records/{key}.json"

    def put(self, root: Path, paths: list[Path]) -> ArtifactRecord:
        """Store every file at or below `paths` (by path relative to `root`); identical content is stored once."""
        return self.put_files({f.relative_to(root).as_posix(): f for path in paths for f in files_below(path)})

    def put_files(self, files: dict[str, Path]) -> ArtifactRecord:
        """Store each file under its name (a relative POSIX path in the artifact)."""
        record = digest_files(files)
        for name, digest in record.files.items():
            if not self.fs.exists(self.blob(digest)):
                temporary = f"{self.blob(digest)}.{uuid.uuid4().hex}.tmp"
                self.fs.put_file(str(files[name]), temporary)
                self.fs.mv(temporary, self.blob(digest))
        return record

    def verify(self, record: ArtifactRecord, label: str) -> None:
        """Hash every blob `record` names; `label` (the artifact) goes into the error."""
        for name, digest in record.files.items():
            try:
                with self.fs.open(self.blob(digest), "rb") as handle:
                    actual = _sha256(handle)
            except FileNotFoundError:
                raise StoreError(f"blob {self.blob(digest)} of {label}:{name} is missing") from None
            self._check(actual, digest, label, name)

    def materialise(self, record: ArtifactRecord, target: Path, label: str) -> None:
        """Copy `record`'s files below `target`, each verified before it takes its final name."""
        for name, digest in record.files.items():
            with atomic_path(target / name) as temporary:
                try:
                    self.fs.get_file(self.blob(digest), str(temporary))
                except FileNotFoundError:
                    raise StoreError(f"blob {self.blob(digest)} of {label}:{name} is missing") from None
                with temporary.open("rb") as handle:
                    self._check(_sha256(handle), digest, label, name)

    def _check(self, actual: str, digest: str, label: str, name: str) -> None:
        if actual != digest:
            raise StoreError(
                f"blob {self.blob(digest)} does not match its digest (it holds {actual[:12]}...); "
                f"it is {label}:{name}; delete it and the records naming it to recompute"
            )

    def lookup(self, key: str) -> ArtifactRecord | None:
        """The record cached under `key`, every blob verified; None when there is none."""
        try:
            content = self.fs.cat_file(self.record(key))
        except FileNotFoundError:
            return None
        record = ArtifactRecord.from_json(content, self.record(key))
        self.verify(record, self.record(key))
        return record

    def save(self, key: str, record: ArtifactRecord) -> None:
        temporary = f"{self.record(key)}.{uuid.uuid4().hex}.tmp"
        self.fs.pipe_file(temporary, record.to_json())
        self.fs.mv(temporary, self.record(key))
