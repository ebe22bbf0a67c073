"""The MoDER pipeline as a Prefect flow, running the stages that `dvc repro` runs, as dvc.yaml defines them.

Every stage instance of dvc.yaml (flows/graph.py) runs as one generic task, `run_stage`, named after the
instance (`backbone`, `train@sketch`, ...), which runs the stage's own command line in-process
(flows/runner.py). Its inputs and outputs are `ArtifactRecord`s: the project paths and SHA-256 digests of
the files a stage reads and writes, whose bytes live in a content-addressed `Store` (`flows/store.py`;
`--store`, `out/store` by default, any fsspec URL). A task copies its inputs from the store into a scratch
directory (each blob verified), runs the stage there, and stores the files it wrote, so a 600 MB backbone
never passes through Prefect.

Caching is ours, not Prefect's: a Prefect result record names its own serializer and Prefect unpickles a
record that says "pickle" whatever the task's own serializer is, so one crafted file in result storage would
run code on the next cached run. Tasks therefore persist nothing through Prefect (`persist_result=False`,
which also turns Prefect's cache policy off) and keep their cache in the store: `records/<cache key>.json`,
JSON only, every blob verified before use. A hit returns a Completed state named "Cached", as Prefect's own
caching does. Cache keys are the stage instance, the slice of params it reads and the digest of its code —
both resolved from dvc.yaml by DVC itself, so DVC and Prefect invalidate the same things — plus the digests
of its input artifacts.

In a DVC project the flow first offers the outputs `dvc repro` left up to date to the store (flows/exchange.py),
so a flow run after `dvc repro` runs none of those stages again; `python -m flows.exchange restore` brings a
flow run's outputs into the workspace and records them with DVC.
"""

import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

from prefect import Task, flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.schemas.objects import TaskRun
from prefect.futures import PrefectFuture
from prefect.states import Completed, State

from flows import exchange
from flows.graph import StageCall, pipeline
from flows.runner import cached_run, inputs_of
from flows.store import DEFAULT_STORE, ArtifactRecord, Store
from moder.errors import USER_ERRORS
from moder.params import Params, ParamsError, load_params, parse_params
from moder.progress import LogLines, progress_to
from moder.results import METHODS
from stages.check_params import check_datasets, check_model
from stages.report import summary_text

GPU_TAG = "gpu"  # tasks that use the accelerator; `python -m flows.setup` caps them at the GPU count


def _retry_unless_user_error(task: Any, task_run: TaskRun, state: State) -> bool:
    """Transient failures are retried; a bad param, input file or store file would fail the same way again."""
    return not isinstance(state.result(raise_on_failure=False), USER_ERRORS)


# persist_result=False: Prefect neither writes nor reads a result, so it never deserializes a stored one.
@task(persist_result=False, retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_unless_user_error)
def run_stage(
    call: StageCall, params_data: dict, upstream: dict[str, ArtifactRecord], store: str
) -> ArtifactRecord | State:
    """The record cached for this call if there is one; else run the stage in a scratch directory holding its
    inputs (the files its dependencies name, of its `upstream` instances' records), store what it wrote and
    cache its record."""
    inputs = inputs_of(call, upstream)
    logger = get_run_logger()
    try:
        with progress_to(LogLines(logger)):  # concurrent tasks' bars would garble one terminal: each logs its own
            record, cached = cached_run(
                call, parse_params(params_data), inputs, Store(store, logger.warning), logger.info
            )
    except Exception as error:
        sources = ", ".join(f"{path} ({artifact.digest[:12]})" for path, artifact in sorted(inputs.items()))
        message = f"{call.label} failed: {error}\n  inputs: {sources or 'none'}"
        raise type(error)(message) if isinstance(error, USER_ERRORS) else RuntimeError(message) from error
    return Completed(name="Cached", data=record) if cached else record  # how Prefect names a cache hit


def stage_task(call: StageCall) -> Task:
    """`run_stage` named after the stage instance, tagged `gpu` if its stage module says it uses the device."""
    tags = [GPU_TAG] if importlib.import_module(call.module).USES_DEVICE else []
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
    offer_dvc_outputs: bool = True,
) -> dict:
    """Every stage of dvc.yaml: backbone -> extract per dataset -> train per dataset (in parallel) and the
    finetune baseline -> hub per step -> evaluate per step -> report.

    `params`: every setting of params.yaml, typed (the run's Parameters tab shows them, and a deployment
    run can change any from the form); None reads them from `params_path`. Stage outputs and the cache
    live in `store` (a local path or any fsspec URL; every task runner worker must reach it); with
    `offer_dvc_outputs`, the outputs `dvc repro` left up to date in dvc_yaml's project are offered to it first.
    Writes metrics.json and reports/ under `out_dir` and returns the metrics.
    """
    if params is None:
        params = load_params(params_path)
    check_model(params)  # settings the model's shape refuses, and a missing dataset, fail the run here
    check_datasets(params)
    params_data = params.model_dump(mode="json")  # defaults written out, as DVC sees them in params.yaml
    calls = pipeline(Path(dvc_yaml), params_data)
    artifacts = Store(store, get_run_logger().warning)
    offered = exchange.offer(Path(dvc_yaml).parent, artifacts) if offer_dvc_outputs else []
    if offered:
        get_run_logger().info("offered %d stage(s) dvc repro left up to date to %s", len(offered), artifacts.url)

    futures: dict[str, PrefectFuture] = {}
    for label, call in calls.items():  # in dependency order; Prefect resolves the futures when a task starts
        upstream = {u: futures[u] for i in call.inputs for u in i.upstream}
        futures[label] = stage_task(call).submit(call, params_data, upstream, artifacts.url)
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
    parser.add_argument(
        "--no-offer", action="store_true", help="do not offer the outputs `dvc repro` left up to date to the store"
    )
    args = parser.parse_args()
    try:
        params = load_params(args.params)
    except ParamsError as error:
        sys.exit(f"error: {error}")
    pipeline = with_task_runner(moder_pipeline, args.dask_workers, args.dask_address, args.dask_log_level.upper())
    # the settings themselves, not the file's name, so the run's Parameters tab shows what ran
    pipeline(
        params=params, params_path=args.params, out_dir=args.out, store=args.store, offer_dvc_outputs=not args.no_offer
    )


if __name__ == "__main__":
    main()
