"""The content-addressed store behind the Prefect flow: round trip, and refusal of anything tampered with."""

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest

from flows.store import ArtifactRecord, Store, StoreError


class MakesMarker:
    """Unpickling this creates `path`: a stand-in for code an attacker would run."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (str(self.path),)


def _outputs(root: Path) -> list[Path]:
    (root / "features" / "a").mkdir(parents=True)
    (root / "features" / "a" / "train.parquet").write_bytes(b"train rows")
    (root / "features" / "a" / "test.parquet").write_bytes(b"test rows")
    (root / "metrics.json").write_text('{"accuracy": 1.0}')
    return [root / "features", root / "metrics.json"]


@pytest.fixture
def stored(tmp_path) -> tuple[Store, ArtifactRecord]:
    store = Store(str(tmp_path / "store"))
    return store, store.put(tmp_path / "stage", _outputs(tmp_path / "stage"))


def test_round_trip_stores_each_content_once_and_restores_every_file(stored, tmp_path):
    store, record = stored
    assert record.files == {
        "features/a/test.parquet": hashlib.sha256(b"test rows").hexdigest(),
        "features/a/train.parquet": hashlib.sha256(b"train rows").hexdigest(),
        "metrics.json": hashlib.sha256(b'{"accuracy": 1.0}').hexdigest(),
    }
    assert store.put(tmp_path / "stage", [tmp_path / "stage" / "metrics.json"]).files == {
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


def test_a_blob_whose_bytes_changed_is_refused_naming_the_blob_and_the_artifact_path(stored, tmp_path):
    store, record = stored
    store.save("k", record)
    blob = Path(store.blob(record.files["metrics.json"]))
    blob.write_bytes(b'{"accuracy": 0.0}')

    with pytest.raises(StoreError, match=rf"blob {blob} does not match its digest.*extract@a:metrics.json"):
        store.materialise(record, tmp_path / "copy", "extract@a")
    assert not (tmp_path / "copy" / "metrics.json").exists()  # nothing unverified is left for a stage to read
    with pytest.raises(StoreError, match=rf"blob {blob} does not match.*records/k.json:metrics.json"):
        store.lookup("k")
    blob.unlink()
    with pytest.raises(StoreError, match=rf"blob {blob} of .*records/k.json:metrics.json is missing"):
        store.lookup("k")


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
def test_a_record_replaced_by_a_pickle_payload_is_refused_without_running_it(stored, tmp_path, tampered):
    store, record = stored
    marker = tmp_path / "marker"
    payload = pickle.dumps(MakesMarker(marker))
    store.save("k", record)
    Path(store.record("k")).write_bytes(payload if tampered == "pickle" else _prefect_result_record(payload))

    with pytest.raises(StoreError, match=rf"{store.record('k')} is not a valid artifact record"):
        store.lookup("k")
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


def test_a_stage_run_through_the_store_is_restored_elsewhere_and_a_tampered_blob_stops_it(tmp_path):
    from flows.calls import run_through_store
    from moder.params import parse_params
    from tests.conftest import FULL, copy_code

    params, store = parse_params(FULL), Store(str(tmp_path / "store"))
    runs = []

    def backbone(root: Path):  # stands in for the stage: writes its two outputs where dvc.yaml puts them
        def run() -> None:
            runs.append(root)
            (root / "data" / "backbone").mkdir(parents=True, exist_ok=True)
            (root / "data" / "backbone" / "clip.safetensors").write_bytes(b"weights")
            (root / "reports").mkdir(exist_ok=True)
            (root / "reports" / "backbone.json").write_text("{}")

        return run

    first, second, third = (copy_code(tmp_path / name) for name in ("first", "second", "third"))
    assert run_through_store("backbone", params, first / "dvc.yaml", store, backbone(first)) is False
    # the same code, params and (no) inputs in another project: restored, with the flow's names in the store
    assert run_through_store("backbone", params, second / "dvc.yaml", store, backbone(second)) is True
    assert runs == [first] and (second / "data" / "backbone" / "clip.safetensors").read_bytes() == b"weights"
    assert (second / "reports" / "backbone.json").read_text() == "{}"
    # another seed is another key: it runs
    other = parse_params({**FULL, "seed": 1})
    assert run_through_store("backbone", other, second / "dvc.yaml", store, backbone(second)) is False
    Path(store.blob(hashlib.sha256(b"weights").hexdigest())).write_bytes(b"tampered")
    with pytest.raises(StoreError, match="does not match its digest"):
        run_through_store("backbone", params, third / "dvc.yaml", store, backbone(third))
    assert not (third / "data").exists() and runs == [first, second]  # nothing restored, nothing run


def test_a_record_that_does_not_fill_the_stage_outputs_is_not_restored():
    from flows.calls import _placement

    targets = {"features/a": Path("/p/data/b/features/a")}
    assert _placement(["features/a/train.parquet"], targets) == {
        "features/a/train.parquet": Path("/p/data/b/features/a/train.parquet")
    }
    assert _placement(["features/ab/train.parquet"], targets) is None  # not below the output
    assert _placement([], targets) is None
    two = {**targets, "features/b": Path("/p/data/b/features/b")}
    assert _placement(["features/a/train.parquet"], two) is None  # features/b left empty


def test_the_wiring_is_in_dependency_order_and_leaves_out_datasets_no_task_uses():
    from flows.calls import stage_inputs
    from moder.params import parse_params
    from tests.conftest import FULL

    params = parse_params({**FULL, "datasets": {**FULL["datasets"], "c": {"classes": 3}}})  # no task uses c
    wiring = stage_inputs(params)
    assert list(wiring) == [
        "backbone", "scan", "extract@a", "extract@b", "train@a", "train@b", "finetune",
        "hub@a", "hub@b", "evaluate@a", "evaluate@b", "report",
    ]  # fmt: skip
    assert wiring["extract@a"] == {"backbone": ("backbone", None), "scan": ("scan", "scans/a.json")}
    assert set(wiring["hub@a"]) == {"backbone", "extract@a", "train@a"}  # the datasets trained by step a
    assert set(wiring["evaluate@a"]) == {"backbone", "extract@a", "extract@b", "train@a", "train@b", "hub@a"}
