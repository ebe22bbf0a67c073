"""The MoDER pipeline as a Prefect flow, running the same stage functions that `dvc repro` runs.

Each stage instance is a task whose inputs and outputs are `ArtifactRecord`s: the paths and
SHA-256 digests of the files a stage reads and writes, whose bytes live in a content-addressed
`Store` (`flows/store.py`; `--store`, `out/store` by default, any fsspec URL). A task copies its
inputs from the store into a scratch directory (each blob verified), calls the stage function on
those paths, and stores the files it wrote, so a 600 MB backbone never passes through Prefect.

Caching is ours, not Prefect's: a Prefect result record names its own serializer and Prefect
unpickles a record that says "pickle" whatever the task's own serializer is, so one crafted file
in result storage would run code on the next cached run. Tasks therefore persist nothing through
Prefect (`persist_result=False`, which also turns Prefect's cache policy off) and keep their cache
in the store: `records/<cache key>.json`, JSON only, every blob verified before use. A hit returns
a Completed state named "Cached", as Prefect's own caching does. Cache keys are content-addressed:
the stage, the slice of params it reads and the digest of its code — both taken from `dvc.yaml`,
so DVC and Prefect invalidate the same things — plus the digests of its input artifacts.
"""
from __future__ import annotations

import hashlib
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml
from prefect import flow, get_run_logger, task
from prefect.client.schemas.objects import TaskRun
from prefect.states import Completed, State

from flows.store import DEFAULT_STORE, ArtifactRecord, Store, StoreError, files_below
from moder.params import parse_params
from stages.common import USER_ERRORS
from stages.backbone import backbone
from stages.evaluate import evaluate
from stages.extract import extract
from stages.finetune import finetune
from stages.report import report
from stages.train import train

GPU_TAG = "gpu"  # tasks that use the accelerator; `python -m flows.setup` caps them at the GPU count
_INTERPOLATION = re.compile(r"\$\{([^}]+)\}")


@dataclass(frozen=True)
class StageCall:
    """One stage instance as DVC defines it: its name, the params it reads, the digest of its code."""

    stage: str
    name: str  # the foreach key ("" for stages without foreach)
    params: dict[str, Any]
    code: str

    @property
    def label(self) -> str:
        return f"{self.stage}@{self.name}" if self.name else self.stage


def _lookup(data: dict, dotted: str) -> Any:
    value: Any = data
    for part in dotted.split("."):
        value = value[part]
    return value


def _digest_paths(root: Path, paths: list[str]) -> str:
    digest = hashlib.sha256()
    for relative in sorted(paths):
        for file in files_below(root / relative):
            digest.update(file.relative_to(root).as_posix().encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def stage_calls(dvc_yaml: Path, params_data: dict) -> dict[str, StageCall]:
    """Every stage instance of `dvc.yaml` with its params slice and code digest, keyed by its DVC name."""
    root = dvc_yaml.parent
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    calls = {}
    for stage, spec in stages.items():
        items = {"": None}
        if "foreach" in spec:
            items = _lookup(params_data, _INTERPOLATION.fullmatch(spec["foreach"]).group(1))
            spec = spec["do"]

        for key, item in items.items():
            def resolve(text: str) -> str:
                def value(match: re.Match) -> str:
                    name = match.group(1)
                    if name == "key":
                        return key
                    if name.startswith("item."):
                        return str(_lookup(item, name[len("item."):]))
                    return str(_lookup(params_data, name))
                return _INTERPOLATION.sub(value, text)

            declared = [resolve(p) for p in spec.get("params", [])]
            code = [resolve(d) for d in spec.get("deps", []) if not resolve(d).startswith("data/")]
            calls[f"{stage}@{key}" if key else stage] = StageCall(
                stage, key, {p: _lookup(params_data, p) for p in declared}, _digest_paths(root, code)
            )
    return calls


def cache_key(call: StageCall, inputs: dict[str, ArtifactRecord]) -> str:
    """The stage instance, its params slice, its code digest and the digests of its inputs."""
    payload = {
        "stage": call.label,
        "params": call.params,
        "code": call.code,
        "inputs": {name: artifact.digest for name, artifact in sorted(inputs.items())},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _retry_unless_user_error(task: Any, task_run: TaskRun, state: State) -> bool:
    """Transient failures are retried; a bad param, input file or store file would fail the same way again."""
    return not isinstance(state.result(raise_on_failure=False), (*USER_ERRORS, StoreError))


def _run_stage(call: StageCall, params_data: dict, inputs: dict[str, ArtifactRecord], store_url: str,
               body: Callable[[Any, Path], list[Path]]) -> ArtifactRecord | State:
    """The record cached for this call if there is one; else copy `inputs` into a scratch directory,
    run `body(params, root)`, store what it wrote and cache its record."""
    store = Store(store_url)
    key = cache_key(call, inputs)
    cached = store.lookup(key)
    if cached is not None:
        get_run_logger().info("%s cached in %s", call.label, store.record(key))
        return Completed(name="Cached", data=cached)  # how Prefect names a cache hit
    params = parse_params(params_data)
    with tempfile.TemporaryDirectory(prefix=f"moder-{call.stage}-") as scratch:
        root = Path(scratch)
        for name, artifact in inputs.items():
            store.materialise(artifact, root, name)
        try:
            outputs = body(params, root)
        except Exception as error:
            sources = ", ".join(f"{name} ({artifact.digest[:12]})" for name, artifact in sorted(inputs.items()))
            message = f"{call.label} failed: {error}\n  inputs: {sources or 'none'}"
            raise type(error)(message) if isinstance(error, USER_ERRORS) else RuntimeError(message) from error
        record = store.put(root, outputs)
    store.save(key, record)
    return record


# persist_result=False: Prefect neither writes nor reads a result, so it never deserializes a stored one.
_TASK_OPTIONS = dict(persist_result=False, retries=2, retry_delay_seconds=5,
                     retry_condition_fn=_retry_unless_user_error)


@task(name="backbone", tags=[GPU_TAG], task_run_name="backbone", **_TASK_OPTIONS)
def backbone_task(call: StageCall, params_data: dict, inputs: dict[str, ArtifactRecord],
                  store: str) -> ArtifactRecord | State:
    def body(params, root):
        backbone(params, root / "backbone" / "clip.safetensors", root / "reports" / "backbone.json")
        return [root / "backbone", root / "reports"]
    return _run_stage(call, params_data, inputs, store, body)


@task(name="extract", tags=[GPU_TAG], task_run_name="extract@{call.name}", **_TASK_OPTIONS)
def extract_task(call: StageCall, params_data: dict, inputs: dict[str, ArtifactRecord],
                 store: str) -> ArtifactRecord | State:
    def body(params, root):
        extract(params, call.name, root / "backbone" / "clip.safetensors", root / "features" / call.name)
        return [root / "features" / call.name]
    return _run_stage(call, params_data, inputs, store, body)


@task(name="train", tags=[GPU_TAG], task_run_name="train@{call.name}", **_TASK_OPTIONS)
def train_task(call: StageCall, params_data: dict, inputs: dict[str, ArtifactRecord],
               store: str) -> ArtifactRecord | State:
    def body(params, root):
        out = root / "experts" / call.name
        train(params, call.name, root / "backbone" / "clip.safetensors", root / "features", out)
        return [out]
    return _run_stage(call, params_data, inputs, store, body)


@task(name="finetune", tags=[GPU_TAG], task_run_name="finetune", **_TASK_OPTIONS)
def finetune_task(call: StageCall, params_data: dict, inputs: dict[str, ArtifactRecord],
                  store: str) -> ArtifactRecord | State:
    def body(params, root):
        finetune(params, root / "backbone" / "clip.safetensors", root / "features", root / "finetune.parquet")
        return [root / "finetune.parquet"]
    return _run_stage(call, params_data, inputs, store, body)


@task(name="evaluate", tags=[GPU_TAG], task_run_name="evaluate@{call.name}", **_TASK_OPTIONS)
def evaluate_task(call: StageCall, params_data: dict, inputs: dict[str, ArtifactRecord],
                  store: str) -> ArtifactRecord | State:
    def body(params, root):
        out, unseen = root / "eval" / f"{call.name}.parquet", root / "unseen" / f"{call.name}.parquet"
        evaluate(params, call.name, root / "backbone" / "clip.safetensors", root / "features", root / "experts", out, unseen)
        return [out, unseen]
    return _run_stage(call, params_data, inputs, store, body)


@task(name="report", task_run_name="report", **_TASK_OPTIONS)
def report_task(call: StageCall, params_data: dict, inputs: dict[str, ArtifactRecord],
                store: str) -> ArtifactRecord | State:
    def body(params, root):
        report(params, root / "eval", root / "finetune.parquet", root / "unseen", root / "metrics.json", root / "reports")
        return [root / "metrics.json", root / "reports"]
    return _run_stage(call, params_data, inputs, store, body)


# persist_result=False: the returned metrics stay in memory, nothing is left for a client to unpickle later.
@flow(name="moder-pipeline", log_prints=True, persist_result=False)
def moder_pipeline(params_path: str = "params.yaml", out_dir: str = "out/prefect", dvc_yaml: str = "dvc.yaml",
                   store: str = DEFAULT_STORE) -> dict:
    """backbone -> extract per dataset -> train per dataset (in parallel) and the finetune baseline
    -> evaluate per step -> report.

    Stage outputs and the cache live in `store` (a local path or any fsspec URL; every task runner
    worker must reach it). Writes metrics.json and reports/ under `out_dir` and returns the metrics.
    """
    params_data = yaml.safe_load(Path(params_path).read_text())
    params = parse_params(params_data, params_path)
    params_data = params.model_dump(mode="json")  # defaults written out, as DVC sees them in params.yaml
    calls = stage_calls(Path(dvc_yaml), params_data)
    artifacts = Store(store)
    url = artifacts.url  # absolute, so that workers in other directories find the same store

    model = backbone_task.submit(calls["backbone"], params_data, {}, url)
    features = {d: extract_task.submit(calls[f"extract@{d}"], params_data, {"backbone": model}, url)
                for d in params.datasets if any(t.dataset == d for t in params.tasks.values())}
    experts = {d: train_task.submit(calls[f"train@{d}"], params_data, {"backbone": model, f"extract@{d}": f}, url)
               for d, f in features.items()}
    all_features = {f"extract@{d}": f for d, f in features.items()}
    baseline = finetune_task.submit(calls["finetune"], params_data, {"backbone": model, **all_features}, url)
    # every step reads every task's experts: the oracle scores tasks not yet trained with their own
    trained = {f"train@{d}": e for d, e in experts.items()}
    evaluations = {name: evaluate_task.submit(calls[f"evaluate@{name}"], params_data,
                                              {"backbone": model, **all_features, **trained}, url)
                   for name in params.tasks}
    # Waiting in dependency order raises the first failing stage's own error (naming its stage and
    # inputs), not the "upstream never finished" of a task downstream of it.
    for future in [model, *features.values(), *experts.values(), baseline, *evaluations.values()]:
        future.result()
    reported = report_task.submit(calls["report"], params_data,
                                  {"finetune": baseline, **{f"evaluate@{t}": e for t, e in evaluations.items()}},
                                  url).result()

    out = Path(out_dir)
    artifacts.materialise(reported, out, "report")
    metrics = json.loads((out / "metrics.json").read_text())
    get_run_logger().info("metrics written to %s: %s", out / "metrics.json", json.dumps(metrics))
    return metrics


def with_task_runner(pipeline: Any, dask_workers: int | None = None, dask_address: str | None = None) -> Any:
    """The flow on Prefect's default thread pool, or fanned out over a Dask cluster (local or remote)."""
    if dask_workers is None and dask_address is None:
        return pipeline
    from prefect_dask import DaskTaskRunner

    if dask_address is not None:
        return pipeline.with_options(task_runner=DaskTaskRunner(address=dask_address))
    return pipeline.with_options(task_runner=DaskTaskRunner(
        cluster_kwargs={"n_workers": dask_workers, "threads_per_worker": 1, "processes": True}))


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Run the MoDER pipeline as a Prefect flow, once.")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="out/prefect", help="where metrics.json and reports/ are written")
    parser.add_argument("--store", default=DEFAULT_STORE,
                        help=f"stage outputs and the cache: a path or fsspec URL (default: {DEFAULT_STORE})")
    parser.add_argument("--dask-workers", type=int, default=None, help="fan out over a local Dask cluster")
    parser.add_argument("--dask-address", default=None, help="or over an existing one, e.g. tcp://host:8786")
    args = parser.parse_args()
    pipeline = with_task_runner(moder_pipeline, args.dask_workers, args.dask_address)
    pipeline(params_path=args.params, out_dir=args.out, store=args.store)


if __name__ == "__main__":
    main()
