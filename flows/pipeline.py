"""The MoDER pipeline as a Prefect flow, running the same stage functions that `dvc repro` runs.

Every stage instance runs as one generic task, `run_stage`, named after the instance (`backbone`,
`train@sketch`, ...). Its inputs and outputs are `ArtifactRecord`s: the paths and SHA-256 digests
of the files a stage reads and writes, whose bytes live in a content-addressed `Store`
(`flows/store.py`; `--store`, `out/store` by default, any fsspec URL). A task copies its inputs
from the store into a scratch directory (each blob verified), calls the stage function on those
paths, and stores the files it wrote, so a 600 MB backbone never passes through Prefect.

Caching is ours, not Prefect's: a Prefect result record names its own serializer and Prefect
unpickles a record that says "pickle" whatever the task's own serializer is, so one crafted file
in result storage would run code on the next cached run. Tasks therefore persist nothing through
Prefect (`persist_result=False`, which also turns Prefect's cache policy off) and keep their cache
in the store: `records/<cache key>.json`, JSON only, every blob verified before use. A hit returns
a Completed state named "Cached", as Prefect's own caching does. Cache keys are content-addressed:
the stage, the slice of params it reads and the digest of its code — both resolved from `dvc.yaml`
by DVC itself, so DVC and Prefect invalidate the same things — plus the digests of its input artifacts.
The stages `dvc repro` runs compute the same keys and use the same store (flows/calls.py), so neither
tool redoes what the other made.
"""

import json
import logging
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import Task, flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.schemas.objects import TaskRun
from prefect.futures import PrefectFuture
from prefect.states import Completed, State

from flows.calls import StageCall, cache_key, stage_calls, stage_inputs
from flows.store import DEFAULT_STORE, ArtifactRecord, Store, StoreError
from moder.params import Params, ParamsError, load_params, parse_params
from moder.progress import LogLines
from moder.results import METHODS
from stages.backbone import backbone
from stages.check_params import check_datasets
from stages.common import USER_ERRORS
from stages.evaluate import evaluate
from stages.extract import extract
from stages.finetune import finetune
from stages.hub import hub
from stages.report import report, summary_text
from stages.scan import scan
from stages.train import train

GPU_TAG = "gpu"  # tasks that use the accelerator; `python -m flows.setup` caps them at the GPU count


@dataclass(frozen=True)
class StageRun:
    """How a task runs one stage of `dvc.yaml` in its scratch directory. Paths are relative to that directory and
    `{key}` is the foreach key, which stages with a foreach also take as their argument after params."""

    function: Callable[..., Any]
    paths: tuple[str, ...]  # the function's path arguments
    outputs: tuple[str, ...]  # what it writes, to store
    gpu: bool = True  # uses the accelerator: tagged `gpu`
    progress: bool = False  # takes `progress`: its bars go to the task's log, not the terminal
    always: bool = False  # runs every time, as `always_changed` in dvc.yaml (its output, not its run, is cached)


_MODEL = "backbone/clip.safetensors"
STAGE_RUNS: dict[str, StageRun] = {
    "scan": StageRun(scan, ("scans",), ("scans",), gpu=False, always=True),
    "backbone": StageRun(backbone, (_MODEL, "reports/backbone.json"), ("backbone", "reports"), progress=True),
    "extract": StageRun(extract, (_MODEL, "features/{key}"), ("features/{key}",)),
    "train": StageRun(train, (_MODEL, "features", "experts/{key}"), ("experts/{key}",), progress=True),
    "finetune": StageRun(finetune, (_MODEL, "features", "finetune.parquet"), ("finetune.parquet",)),
    "hub": StageRun(hub, (_MODEL, "features", "experts", "hub/{key}.parquet"), ("hub/{key}.parquet",), gpu=False),
    "evaluate": StageRun(
        evaluate,
        (_MODEL, "features", "experts", "hub/{key}.parquet", "eval/{key}.parquet", "unseen/{key}.parquet"),
        ("eval/{key}.parquet", "unseen/{key}.parquet"),
    ),
    "report": StageRun(
        report,
        ("eval", "finetune.parquet", "unseen", "hub", "experts", "metrics.json", "reports"),
        ("metrics.json", "reports"),
        gpu=False,
    ),
}


def _retry_unless_user_error(task: Any, task_run: TaskRun, state: State) -> bool:
    """Transient failures are retried; a bad param, input file or store file would fail the same way again."""
    return not isinstance(state.result(raise_on_failure=False), (*USER_ERRORS, StoreError))


# persist_result=False: Prefect neither writes nor reads a result, so it never deserializes a stored one.
@task(persist_result=False, retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_unless_user_error)
def run_stage(
    call: StageCall, params_data: dict, inputs: dict[str, ArtifactRecord], store: str
) -> ArtifactRecord | State:
    """The record cached for this call if there is one; else copy `inputs` into a scratch directory, run the stage
    there, store what it wrote and cache its record."""
    artifacts = Store(store)
    key = cache_key(call, inputs)
    run = STAGE_RUNS[call.stage]
    cached = None if run.always else artifacts.lookup(key)
    if cached is not None:
        get_run_logger().info("%s cached in %s", call.label, artifacts.record(key))
        return Completed(name="Cached", data=cached)  # how Prefect names a cache hit
    params = parse_params(params_data)
    with tempfile.TemporaryDirectory(prefix=f"moder-{call.stage}-") as scratch:
        root = Path(scratch)
        for name, artifact in inputs.items():
            artifacts.materialise(artifact, root, name)
        keys = [call.name] if call.name else []  # a foreach stage takes its key after params
        paths = [root / path.format(key=call.name) for path in run.paths]
        # concurrent tasks' bars on one terminal garble it: each task logs its own progress instead
        quiet = {"progress": LogLines(get_run_logger())} if run.progress else {}
        try:
            run.function(params, *keys, *paths, **quiet)
        except Exception as error:
            sources = ", ".join(f"{name} ({artifact.digest[:12]})" for name, artifact in sorted(inputs.items()))
            message = f"{call.label} failed: {error}\n  inputs: {sources or 'none'}"
            raise type(error)(message) if isinstance(error, USER_ERRORS) else RuntimeError(message) from error
        record = artifacts.put(root, [root / path.format(key=call.name) for path in run.outputs])
    if not run.always:  # an always-run stage's record would never be looked up
        artifacts.save(key, record)
    return record


def stage_task(call: StageCall) -> Task:
    """`run_stage` named after the stage instance, tagged `gpu` if the stage uses the accelerator."""
    tags = [GPU_TAG] if STAGE_RUNS[call.stage].gpu else []
    # The task's name too: Prefect applies task_run_name only when a run starts, so a run blocked by a failed
    # upstream keeps the name "<task name>-<3 hex digits>" (train@mine-d30, not train-d30).
    return run_stage.with_options(name=call.label, task_run_name=call.label, tags=tags)


# persist_result=False: the returned metrics stay in memory, nothing is left for a client to unpickle later.
@flow(name="moder-pipeline", log_prints=True, persist_result=False)
def moder_pipeline(
    params: Params | None = None,
    params_path: str = "params.yaml",
    out_dir: str = "out/prefect",
    dvc_yaml: str = "dvc.yaml",
    store: str = DEFAULT_STORE,
) -> dict:
    """backbone -> extract per dataset -> train per dataset (in parallel) and the finetune baseline
    -> hub per step -> evaluate per step -> report.

    `params`: every setting of params.yaml, typed (the run's Parameters tab shows them, and a deployment
    run can change any from the form); None reads them from `params_path`. Stage outputs and the cache
    live in `store` (a local path or any fsspec URL; every task runner worker must reach it). Writes
    metrics.json and reports/ under `out_dir` and returns the metrics.
    """
    if params is None:
        params = load_params(params_path)
    check_datasets(params)  # a missing dataset fails the run here, before any stage
    params_data = params.model_dump(mode="json")  # defaults written out, as DVC sees them in params.yaml
    calls = stage_calls(Path(dvc_yaml), params_data)
    artifacts = Store(store)
    url = artifacts.url  # absolute, so that workers in other directories find the same store

    def submit(label: str, inputs: dict[str, PrefectFuture | ArtifactRecord]) -> PrefectFuture:
        return stage_task(calls[label]).submit(calls[label], params_data, inputs, url)

    futures: dict[str, PrefectFuture] = {}
    for label, wiring in stage_inputs(params).items():  # in dependency order
        inputs = {
            # a stage reading one file of another's outputs (an extract, its dataset's listing) waits for that one
            name: futures[upstream].result().only(only) if only else futures[upstream]
            for name, (upstream, only) in wiring.items()
        }
        futures[label] = submit(label, inputs)
    # Waiting in dependency order raises the first failing stage's own error (naming its stage and
    # inputs), not the "upstream never finished" of a task downstream of it.
    for future in futures.values():
        future.result()
    reported = futures["report"].result()

    out = Path(out_dir)
    artifacts.materialise(reported, out, "report")
    metrics = json.loads((out / "metrics.json").read_text())
    get_run_logger().info("metrics written to %s: %s", out / "metrics.json", json.dumps(metrics))
    publish_results(params, metrics, out)
    return metrics


def publish_results(params: Params, metrics: dict, out: Path) -> None:
    """The run's results in Prefect's UI (its Artifacts tab), also when every stage came from the cache:
    a table of each method's metrics, MoDER's gain, composition's and calibration's own effects and the
    share of the oracle's headroom taken, and the summary `make run` prints."""
    gain = {name: round(value - metrics["zeroshot"][name], 2) for name, value in metrics["moder"].items()}
    headroom, shares = metrics["headroom"], (("transfer", ""), ("transfer_new", "_new"))
    effects = [
        {"method": "moder - zeroshot", **gain},
        {"method": "composition (moder - no_composition)", **metrics["composition"]},
        {"method": "calibration (moder - no_calibration)", **metrics["calibration"]},
        *(
            {
                "method": f"{what}: share of the oracle's headroom",
                **{key: headroom[f"{what}{suffix}"] for key, suffix in shares if f"{what}{suffix}" in headroom},
            }
            for what in ("moder", "composition")
        ),
    ]
    create_table_artifact(
        key="moder-metrics",
        table=[*({"method": method, **metrics[method]} for method in METHODS), *effects],
        description=f"{params.benchmark.name}, seed {params.seed}: accuracy (%) per method",
    )
    create_markdown_artifact(
        key="moder-summary",
        markdown=f"```\n{summary_text(params, out / 'reports', out / 'metrics.json').strip()}\n```",
        description=f"{params.benchmark.name}, seed {params.seed}: per task, the metrics, the settings, the hub's cost",
    )


def with_task_runner(
    pipeline: Any,
    dask_workers: int | None = None,
    dask_address: str | None = None,
    dask_log_level: int | str = logging.WARNING,
) -> Any:
    """The flow on Prefect's default thread pool, or fanned out over a Dask cluster (local or remote)."""
    if dask_workers is None and dask_address is None:
        return pipeline
    from prefect_dask import DaskTaskRunner

    # the scheduler and nannies of a local cluster log every start, stop and connection at INFO through
    # Prefect's handlers (about 35 lines a run); their warnings and errors still show
    logging.getLogger("distributed").setLevel(dask_log_level)
    if dask_address is not None:
        return pipeline.with_options(task_runner=DaskTaskRunner(address=dask_address))
    return pipeline.with_options(
        task_runner=DaskTaskRunner(
            cluster_kwargs={"n_workers": dask_workers, "threads_per_worker": 1, "processes": True}
        )
    )


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Run the MoDER pipeline as a Prefect flow, once.")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="out/prefect", help="where metrics.json and reports/ are written")
    parser.add_argument(
        "--store",
        default=DEFAULT_STORE,
        help=f"stage outputs and the cache: a path or fsspec URL (default: {DEFAULT_STORE})",
    )
    parser.add_argument("--dask-workers", type=int, default=None, help="fan out over a local Dask cluster")
    parser.add_argument("--dask-address", default=None, help="or over an existing one, e.g. tcp://host:8786")
    parser.add_argument("--dask-log-level", default="WARNING", help="of Dask's own loggers (default: WARNING)")
    args = parser.parse_args()
    try:
        params = load_params(args.params)
    except ParamsError as error:
        sys.exit(f"error: {error}")
    pipeline = with_task_runner(moder_pipeline, args.dask_workers, args.dask_address, args.dask_log_level.upper())
    # the settings themselves, not the file's name, so the run's Parameters tab shows what ran
    pipeline(params=params, params_path=args.params, out_dir=args.out, store=args.store)


if __name__ == "__main__":
    main()
