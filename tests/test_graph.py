"""dvc.yaml as the one description of the pipeline: the graph the flow, validation and the tests run is DVC's
own, and a stage instance run in-process through the store runs once per params, code and inputs."""

import json
import shutil

import pytest

from flows.graph import pipeline
from flows.runner import cache_key, cached_run, inputs_of, merged, run_graph, upstream_of
from flows.store import ArtifactRecord, Store
from moder.params import parse_params
from tests.conftest import FULL, REPO


def _dvc_edges(dvc_yaml, params_data) -> dict[str, set[str]]:
    """Each stage instance -> the instances it depends on, as DVC's own graph has them."""
    from dvc.fs import MemoryFileSystem
    from dvc.repo import Repo

    fs = MemoryFileSystem(global_store=False)
    fs.pipe({"/dvc.yaml": dvc_yaml.read_bytes(), "/params.yaml": json.dumps(params_data).encode()})
    with Repo("/", fs=fs, uninitialized=True) as repo:
        graph = repo.index.graph
        return {stage.name: {dep.name for dep in graph.successors(stage)} for stage in graph.nodes}


def test_the_graph_is_dvc_yamls_as_dvc_reads_it():
    calls = pipeline(REPO / "dvc.yaml", FULL)
    edges = _dvc_edges(REPO / "dvc.yaml", FULL)
    assert set(calls) == {name for name in edges if name != "params"}  # a stage that writes nothing is not run
    for label, call in calls.items():
        assert {u for i in call.inputs for u in i.upstream} == edges[label], label
        before = list(calls)[: list(calls).index(label)]
        assert edges[label] <= set(before), f"{label} comes before what it reads"
    extract = calls["extract@a"]
    assert extract.module == "stages.extract" and extract.argv[:2] == ("--dataset", "a")
    assert {i.path: i.upstream for i in extract.inputs} == {
        "data/backbone/clip.safetensors": ("backbone",),
        "data/mini-mtil/scans/a.json": ("scan",),  # one file of the scan's output directory
    }
    features = next(i for i in calls["evaluate@a"].inputs if i.path == "data/mini-mtil/features")
    assert features.upstream == ("extract@a", "extract@b")  # a directory of several stages' outputs
    assert calls["scan"].always and not calls["backbone"].always
    assert calls["train@a"].params == {
        "seed": 0,
        "model": FULL["model"],
        "expert": FULL["expert"],
        "train": FULL["train"],
        "composition.alpha": FULL["composition"]["alpha"],
        "datasets.a": FULL["datasets"]["a"],
    }
    assert upstream_of(calls, ["hub@a"]) == {
        "hub@a",
        "backbone",
        "scan",
        "extract@a",
        "extract@b",
        "train@a",
        "train@b",
    }


def test_code_digests_follow_the_files_each_stage_imports(tmp_path):
    for name in ("dvc.yaml", "moder", "stages"):
        source = REPO / name
        shutil.copytree(source, tmp_path / name) if source.is_dir() else shutil.copy(source, tmp_path / name)

    def changed_by(edit: str) -> set[str]:
        before = pipeline(tmp_path / "dvc.yaml", FULL)
        path = tmp_path / edit
        path.write_text(path.read_text() + "\n# edited\n")
        after = pipeline(tmp_path / "dvc.yaml", FULL)
        return {label for label in before if before[label].code != after[label].code}

    assert changed_by("stages/train.py") == {"train@a", "train@b"}
    # an adapter is read by extraction alone: pre-training, training and evaluation do not re-run
    assert changed_by("moder/datasets/cifar100.py") == {"extract@a", "extract@b"}


def test_merged_inputs_hold_the_files_below_a_dependency():
    a = ArtifactRecord.of({"data/b/features/a/train.parquet": "1" * 64, "data/b/features/a/test.parquet": "2" * 64})
    b = ArtifactRecord.of({"data/b/features/b/train.parquet": "3" * 64})
    scans = ArtifactRecord.of({"data/b/scans/a.json": "4" * 64, "data/b/scans/b.json": "5" * 64})
    assert merged([a, b], "data/b/features").files == {**a.files, **b.files}
    assert merged([scans], "data/b/scans/a.json").files == {"data/b/scans/a.json": "4" * 64}
    assert merged([a], "data/b/feat").files == {}  # a name that only starts the same is not below it


def test_a_stage_runs_once_per_params_code_and_inputs(tmp_path, monkeypatch):
    import stages.backbone

    params = parse_params(FULL)
    calls = pipeline(REPO / "dvc.yaml", FULL)
    store, hits = Store(str(tmp_path / "store")), []
    runs = []
    real = stages.backbone.run
    monkeypatch.setattr(stages.backbone, "run", lambda args, params: runs.append(args.out) or real(args, params))
    first, cached = cached_run(calls["backbone"], params, {}, store, hits.append)
    assert not cached and runs and set(first.files) == {"data/backbone/clip.safetensors", "reports/backbone.json"}
    again, cached = cached_run(calls["backbone"], params, {}, store, hits.append)
    assert (
        cached
        and again == first
        and len(runs) == 1
        and hits == [f"backbone cached in {store.record(cache_key(calls['backbone'], {}))}"]
    )
    other = parse_params({**FULL, "seed": 1})
    _, cached = cached_run(pipeline(REPO / "dvc.yaml", other.model_dump(mode="json"))["backbone"], other, {}, store)
    assert not cached and len(runs) == 2  # another seed, another key
    # the inputs' digests are in the key: the same stage on other files is another run
    scan = {"data/backbone/clip.safetensors": first, "data/mini-mtil/scans/a.json": ArtifactRecord.of({})}
    assert cache_key(calls["extract@a"], scan) != cache_key(
        calls["extract@a"], {**scan, "data/backbone/clip.safetensors": ArtifactRecord.of({})}
    )


def test_run_graph_runs_what_its_targets_need_and_hands_records_on(tmp_path):
    params = parse_params(FULL)
    calls = pipeline(REPO / "dvc.yaml", FULL)
    records = run_graph(calls, params, Store(str(tmp_path / "store")), ["extract@a"])
    assert set(records) == {"backbone", "scan", "extract@a"}
    assert set(records["extract@a"].files) == {
        f"data/mini-mtil/features/a/{name}.parquet" for name in ("train", "test", "classes")
    } | {"data/mini-mtil/features/a/.moder-output"}
    assert inputs_of(calls["extract@a"], records)["data/mini-mtil/scans/a.json"].files.keys() == {
        "data/mini-mtil/scans/a.json"
    }
    inputs_of(calls["train@a"], records)  # what train@a reads is made
    with pytest.raises(KeyError):
        inputs_of(calls["train@b"], records)  # extract@b's outputs are not
