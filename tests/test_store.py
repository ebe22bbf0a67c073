"""The content-addressed store behind the Prefect flow: round trip, and refusal of anything tampered with."""

import hashlib
import json
import os
import pickle
import time
from pathlib import Path

import pytest

from flows.store import ArtifactRecord, Store, StoreError, files_below


class MakesMarker:
    """Unpickling this creates `path`: a stand-in for code an attacker would run."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (str(self.path),)


def _outputs(root: Path) -> dict[str, Path]:
    (root / "features" / "a").mkdir(parents=True)
    (root / "features" / "a" / "train.parquet").write_bytes(b"train rows")
    (root / "features" / "a" / "test.parquet").write_bytes(b"test rows")
    (root / "metrics.json").write_text('{"accuracy": 1.0}')
    return {f.relative_to(root).as_posix(): f for f in files_below(root)}


@pytest.fixture
def stored(tmp_path) -> tuple[Store, ArtifactRecord]:
    store = Store(str(tmp_path / "store"), warn=_warnings.append)
    _warnings.clear()
    return store, store.put_files(_outputs(tmp_path / "stage"))


_warnings: list[str] = []


def test_round_trip_stores_each_content_once_and_restores_every_file(stored, tmp_path):
    store, record = stored
    assert record.files == {
        "features/a/test.parquet": hashlib.sha256(b"test rows").hexdigest(),
        "features/a/train.parquet": hashlib.sha256(b"train rows").hexdigest(),
        "metrics.json": hashlib.sha256(b'{"accuracy": 1.0}').hexdigest(),
    }
    assert store.put_files({"metrics.json": tmp_path / "stage" / "metrics.json"}).files == {
        "metrics.json": record.files["metrics.json"]
    }
    assert len(list((tmp_path / "store" / "blobs").iterdir())) == 3  # no temporaries left behind

    store.materialise(record, tmp_path / "copy", "extract@a")
    for name in record.files:
        assert (tmp_path / "copy" / name).read_bytes() == (tmp_path / "stage" / name).read_bytes()

    assert store.lookup("k") is None
    store.save("k", record)
    assert store.lookup("k") == record
    assert ArtifactRecord.from_json(record.to_json(), "here") == record
    assert Store(store.url).lookup("k") == record  # the absolute URL finds the same store


def test_a_blob_whose_bytes_changed_is_a_miss_naming_it_and_never_reaches_a_stage(stored, tmp_path):
    store, record = stored
    store.save("k", record)
    blob = Path(store.blob(record.files["metrics.json"]))
    blob.write_bytes(b'{"accuracy": 0.0}')

    with pytest.raises(StoreError, match=rf"blob {blob} does not match its digest.*extract@a:metrics.json"):
        store.materialise(record, tmp_path / "copy", "extract@a")
    assert not (tmp_path / "copy" / "metrics.json").exists()  # nothing unverified is left for a stage to read
    assert store.lookup("k") is None  # a cache: the stage runs again instead
    assert _warnings == [
        f"warning: store miss: blob {blob} of {store.record('k')}:metrics.json does not match its digest (removed); "
        "recomputing"
    ]
    assert not blob.exists()  # a blob that does not match its name can never be right
    store.save("k", store.put_files(_outputs(tmp_path / "again")))  # the stage's new record replaces it
    assert store.lookup("k") == record and blob.read_bytes() == b'{"accuracy": 1.0}'
    blob.unlink()
    assert store.lookup("k") is None and "is missing" in _warnings[-1] and store.record("k") in _warnings[-1]


def test_a_write_that_fails_leaves_no_temporary_and_names_the_store(stored, tmp_path, monkeypatch):
    store, _ = stored
    full = OSError(28, "No space left on device")

    def fails(source: str, temporary: str) -> None:
        Path(temporary).write_bytes(b"half")
        raise full

    monkeypatch.setattr(store.fs, "put_file", fails)
    (tmp_path / "new.bin").write_bytes(b"new content")
    with pytest.raises(
        StoreError, match=r"cannot write .*/blobs/[0-9a-f]{64} into the store \(No space left on device\)"
    ):
        store.put_files({"new.bin": tmp_path / "new.bin"})
    assert not [p for p in (tmp_path / "store" / "blobs").iterdir() if p.name.endswith(".tmp")]


def test_prune_removes_records_unused_for_a_while_and_blobs_no_record_names(stored, tmp_path):
    store, record = stored
    store.save("old", record)
    store.save("recent", ArtifactRecord.of({"metrics.json": record.files["metrics.json"]}))
    old = Path(store.record("old"))
    os.utime(old, (time.time() - 40 * 86400,) * 2)
    stale = Path(store.blob("0" * 64) + ".abc.tmp")
    stale.write_bytes(b"an interrupted write")
    os.utime(stale, (time.time() - 2 * 86400,) * 2)
    assert store.prune(30) == (1, 3, len(b"train rows") + len(b"test rows") + len(b"an interrupted write"))
    assert not old.exists() and store.lookup("recent") is not None
    assert sorted(p.name for p in (tmp_path / "store" / "blobs").iterdir()) == [record.files["metrics.json"]]
    store.lookup("recent")  # a hit counts as a use
    assert time.time() - Path(store.record("recent")).stat().st_mtime < 60


def _prefect_result_record(payload: bytes) -> bytes:
    """What Prefect 3 writes for a persisted result, naming the pickle serializer."""
    import base64

    return json.dumps(
        {
            "metadata": {
                "storage_key": "x",
                "expiration": None,
                "serializer": {"type": "pickle"},
                "prefect_version": "3",
                "storage_block_id": None,
            },
            "result": base64.b64encode(payload).decode(),
        }
    ).encode()


@pytest.mark.parametrize("tampered", ["pickle", "prefect record naming pickle"])
def test_a_record_replaced_by_a_pickle_payload_is_a_miss_that_runs_nothing(stored, tmp_path, tampered):
    store, record = stored
    marker = tmp_path / "marker"
    payload = pickle.dumps(MakesMarker(marker))
    store.save("k", record)
    Path(store.record("k")).write_bytes(payload if tampered == "pickle" else _prefect_result_record(payload))

    assert store.lookup("k") is None
    assert _warnings[-1].startswith(f"warning: store miss: {store.record('k')} is not a valid artifact record")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../x", "./a", "a//b", "a\\..\\..\\x", ""])
def test_a_record_path_that_could_leave_the_artifact_root_is_refused(tmp_path, name):
    digest = hashlib.sha256(b"x").hexdigest()
    forged = json.dumps(
        {"files": {name: digest}, "digest": hashlib.sha256(name.encode() + b"\0" + bytes.fromhex(digest)).hexdigest()}
    )
    with pytest.raises(StoreError, match="not a plain relative path"):
        ArtifactRecord.from_json(forged.encode(), "forged.json")
    with pytest.raises(ValueError, match="not a plain relative path"):
        ArtifactRecord.of({name: digest})


@pytest.mark.parametrize("digest", ["../../records/k.json", "ABC", hashlib.sha256(b"x").hexdigest().upper()])
def test_a_digest_that_is_not_64_hex_digits_is_refused(digest):
    with pytest.raises(StoreError, match="is not a SHA-256 hex digest"):
        ArtifactRecord.from_json(json.dumps({"files": {"a": digest}, "digest": "0" * 64}).encode(), "forged.json")


def test_a_record_whose_digest_does_not_cover_its_files_is_refused(stored):
    _, record = stored
    forged = json.loads(record.to_json())
    forged["files"]["metrics.json"] = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(StoreError, match="forged.json is not a valid artifact record .*digest does not match"):
        ArtifactRecord.from_json(json.dumps(forged).encode(), "forged.json")
