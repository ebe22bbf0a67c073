"""The Prefect flow against a real Prefect server on loopback: caching, deployment, Dask, GPU limit."""

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from moder.results import METHODS
from tests.conftest import FULL, MINI, MINI_STAGES, REPO, dvc, full_params, ran_stages, run_command

prefect = pytest.importorskip("prefect")

pytestmark = pytest.mark.slow  # a DVC project or a Prefect server: the slow tier


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the whole module: every process started without one would start its own (slow)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from flows.local_server import local_server

    home = tmp_path_factory.mktemp("prefect-home")
    with local_server(home) as client_env:
        saved = {key: os.environ.get(key) for key in client_env}
        os.environ.update(client_env)  # Dask workers and served runs inherit it
        with temporary_settings(
            {
                PREFECT_API_URL: client_env["PREFECT_API_URL"],
                PREFECT_LOCAL_STORAGE_PATH: client_env["PREFECT_LOCAL_STORAGE_PATH"],
            }
        ):
            yield {"url": client_env["PREFECT_API_URL"], "env": {**os.environ, **client_env}, "home": home}
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all()  # before the server goes away
            EventsWorker.drain_all()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _start(command: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    """A long-running process (serving runs, a worker), its output kept in `log` for failure messages."""
    with log.open("w") as stream:  # the child holds its own copy of the descriptor
        return subprocess.Popen(
            command, cwd=cwd, env=env, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True
        )


def _stop(process: subprocess.Popen) -> None:
    """Ask a process started by `_start` to stop; a Prefect worker on a loaded machine can take longer than
    half a minute to shut down gracefully, so then its whole session is killed."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _task_runs(state, expected: int | None = None) -> list:
    """The flow run's task runs as the server has them, once the server has settled: every run in a final state
    (and `expected` of them, when given); a loaded machine can take seconds to record the last ones."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs: list = []
    with get_client(sync_client=True) as client:
        for _ in range(60):
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
            )
            settled = all(
                run.state is not None and (run.state.is_final() or run.state.name == "NotReady") for run in runs
            )
            if settled and (expected is None or len(runs) == expected):
                return runs
            time.sleep(0.5)
    return runs


def _run(
    params_path: Path | None, out: Path, store: Path, params=None, dvc_yaml=REPO / "dvc.yaml", offer=False, **runner
) -> tuple[dict, dict[str, str]]:
    """Run the flow in this process (settings from `params_path`, or typed `params`); return its metrics and
    {task run name: final state name}. Its log messages are kept in `_run.logs`."""
    from flows.pipeline import moder_pipeline, with_task_runner

    state = with_task_runner(moder_pipeline, **runner)(
        params=params,
        params_path=str(params_path),
        out_dir=str(out),
        store=str(store),
        dvc_yaml=str(dvc_yaml),
        offer_dvc_outputs=offer,
        return_state=True,
    )
    assert state.is_completed(), state.message
    _run.logs = _log_messages(state)
    return state.result(), {run.name: run.state.name for run in _task_runs(state)}


def _latest_flow_run_parameters(deployment: str | None = None) -> dict:
    """The parameters of the latest flow run (of `deployment`, "flow/name"), as Prefect's API stores them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        deployments = (
            None if deployment is None else DeploymentFilter(name=DeploymentFilterName(any_=[deployment.split("/")[1]]))
        )
        (run,) = client.read_flow_runs(deployment_filter=deployments, sort=FlowRunSort.START_TIME_DESC, limit=1)
        return run.parameters


def _log_messages(state) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all()  # logs reach the server in batches
    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    return [log.message for log in logs]


def _artifacts(keys: tuple[str, ...]) -> list:
    """The latest artifact under each key: a table as its rows, markdown as its text."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    found = []
    with get_client(sync_client=True) as client:
        for key in keys:
            (artifact,) = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                sort=ArtifactSort.CREATED_DESC,
                limit=1,
            )
            found.append(json.loads(artifact.data) if artifact.type == "table" else artifact.data)
    return found


def _executed(states: dict[str, str]) -> set[str]:
    """The task runs that ran, not counting `scan`, which runs every time (it lists the datasets' files)."""
    return {name for name, state in states.items() if state != "Cached" and name != "scan"}


def test_cache_reuses_earlier_steps_and_recomputes_exactly_what_a_change_touches(server, tmp_path):
    params, store = _write(tmp_path / "params.yaml", FULL), tmp_path / "store"
    first, states = _run(params, tmp_path / "run1", store)
    everything = MINI_STAGES - {"params"}  # the flow validates params itself, not as a task
    assert set(states) == everything and _executed(states) == everything - {"scan"}
    assert json.loads((tmp_path / "run1" / "metrics.json").read_text()) == first
    # progress bars went to the tasks' logs as plain lines (no terminal codes), the last one complete
    bars = [m for m in _run.logs if m.startswith(("pretrain CLIP", "train experts"))]
    assert any(m.startswith("pretrain CLIP: 100%") for m in bars), _run.logs
    assert any(m.startswith("train experts: 100%") for m in bars) and not any("\x1b" in m or "\r" in m for m in bars)

    again, states = _run(params, tmp_path / "run2", store)
    assert again == first and _executed(states) == set() and states.pop("scan") == "Completed"
    assert set(states.values()) == {"Cached"}
    table, summary = _artifacts(("moder-metrics", "moder-summary"))  # the cached run's own
    assert [row["method"] for row in table] == [
        *METHODS,
        "moder - zeroshot",
        "composition (moder - no_composition)",
        "calibration (moder - no_calibration)",
        "moder: share of the oracle's headroom",
        "composition: share of the oracle's headroom",
    ]
    assert table[0]["transfer"] == first["moder"]["transfer"]
    assert table[6]["last"] == pytest.approx(first["moder"]["last"] - first["zeroshot"]["last"], abs=0.006)
    assert table[7]["transfer_new"] == first["composition"]["transfer_new"]
    if "moder" in first["headroom"]:
        assert table[9]["transfer"] == first["headroom"]["moder"]
    assert summary.startswith("```\nMoDER on mini-mtil") and "hub after the last step:" in summary
    assert json.loads((tmp_path / "run2" / "metrics.json").read_text()) == first
    prefect_results = [f for f in (server["home"] / "storage").rglob("*") if f.is_file()]
    assert prefect_results == []  # the cache is the store's: Prefect holds nothing it could deserialize

    appended = full_params(
        {
            **MINI,
            "datasets": {**MINI["datasets"], "c": {"classes": 3}},
            "tasks": {**MINI["tasks"], "c": {"dataset": "c"}},
        }
    )
    _, states = _run(_write(tmp_path / "appended.yaml", appended), tmp_path / "run3", store)
    # the earlier hubs read the task list, so they run again (giving the same bytes, see test_dvc_pipeline)
    hubs = {"hub@a", "hub@b", "hub@c"}
    assert (
        _executed(states)
        == {"extract@c", "train@c", "finetune", "evaluate@a", "evaluate@b", "evaluate@c", "report"} | hubs
    )

    other_k = {**appended, "retrieval": {**appended["retrieval"], "k": 2}}
    _, states = _run(_write(tmp_path / "k2.yaml", other_k), tmp_path / "run4", store)
    assert _executed(states) == {"evaluate@a", "evaluate@b", "evaluate@c", "report"} | hubs

    # typed settings instead of a file: they drive the run and its Parameters carry every one of them
    from moder.params import parse_params

    typed = parse_params({**other_k, "retrieval": {**other_k["retrieval"], "k": 1}})
    _, states = _run(None, tmp_path / "run5", store, params=typed)
    assert _executed(states) == {"evaluate@a", "evaluate@b", "evaluate@c", "report"} | hubs
    recorded = _latest_flow_run_parameters()["params"]
    assert recorded == typed.model_dump(mode="json") and recorded["retrieval"]["k"] == 1


def test_served_deployment_run_matches_the_dvc_run(server, project, tmp_path):
    from moder.params import parse_params

    root, _ = project
    env = {**server["env"], "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    serving = _start([sys.executable, "-m", "flows.serve", "--name", "test"], root, env, tmp_path / "serve.log")
    try:
        out = tmp_path / "served"
        command = [
            str(Path(sys.executable).parent / "prefect"),
            "deployment",
            "run",
            "moder-pipeline/test",
            "--param",
            f"out_dir={out}",
            "--param",
            f"store={tmp_path / 'store'}",
            "--watch",
        ]
        for _ in range(60):  # the deployment exists once the serving process has registered it
            result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
            if "not found" not in (result.stdout + result.stderr).lower():
                break
            time.sleep(1)
        assert result.returncode == 0, result.stdout + result.stderr + (tmp_path / "serve.log").read_text()[-3000:]
        assert "Completed" in result.stdout
        # the deployment offers the file's settings, typed: the run's Parameters show them
        recorded = _latest_flow_run_parameters("moder-pipeline/test")["params"]
        assert recorded == parse_params(yaml.safe_load((root / "params.yaml").read_text())).model_dump(mode="json")
        assert json.loads((out / "metrics.json").read_text()) == json.loads((root / "metrics.json").read_text())
        # the flow builds the same hubs, byte for byte: their digests name blobs in its store
        for step in ("a", "b"):
            digest = hashlib.sha256((root / "data" / "mini-mtil" / "hub" / f"{step}.parquet").read_bytes()).hexdigest()
            assert (tmp_path / "store" / "blobs" / digest).is_file()
    finally:
        _stop(serving)


def test_the_flow_and_dvc_repro_run_each_stage_once_between_them(server, project, tmp_path):
    """The exchange is the flow's: it offers what `dvc repro` made to its store before it submits tasks, and
    `python -m flows.exchange restore` brings what the flow made into the workspace, recorded by DVC."""
    from moder.params import parse_params

    root, _ = project
    store = tmp_path / "store"
    metrics, states = _run(root / "params.yaml", tmp_path / "flow", store, dvc_yaml=root / "dvc.yaml", offer=True)
    assert _executed(states) == set() and metrics == json.loads((root / "metrics.json").read_text())
    # the other way round: the flow makes everything for seed 1, then the workspace takes it and DVC runs nothing
    flow_metrics, states = _run(None, tmp_path / "flow-seed1", store, params=parse_params({**FULL, "seed": 1}))
    assert _executed(states) == MINI_STAGES - {"params", "scan"}
    try:
        run_command([sys.executable, "-m", "stages.compose", "seed=1"], root)
        restored = run_command([sys.executable, "-m", "flows.exchange", "restore", "--store", str(store)], root)
        assert f"{len(MINI_STAGES) - 2} stage(s) restored from" in restored.stdout  # not params (no outputs), scan
        ran = dvc(root, "repro")
        assert ran_stages(ran.stdout) == {"params", "scan"}  # params: params.yaml changed; scan runs every time
        assert json.loads((root / "metrics.json").read_text()) == flow_metrics
    finally:  # the workspace back at the fixture's committed run, its outputs from DVC's cache
        run_command([sys.executable, "-m", "stages.compose", "--reset"], root)
        run_command(["git", "checkout", "--", "params.yaml", "dvc.lock", "metrics.json", "reports"], root)
        dvc(root, "checkout")
    assert json.loads((root / "metrics.json").read_text()) == metrics


def test_dask_task_runner_on_two_local_workers_gives_the_same_metrics(server, project, tmp_path, caplog):
    root, _ = project
    # a new store, so nothing is cached: every task runs on the workers
    metrics, states = _run(root / "params.yaml", tmp_path / "dask", tmp_path / "store", dask_workers=2)
    assert _executed(states) == set(states) - {"scan"} and len(states) == len(MINI_STAGES) - 1  # all but params
    # Dask's INFO chatter is off (was ~35 lines on the console): its loggers make no record below WARNING
    assert not [r for r in caplog.records if r.name.startswith("distributed") and r.levelno < logging.WARNING]
    # Dask's workers run torch on one thread each (distributed sets OMP_NUM_THREADS=1), as the tests run DVC's stages
    # (tests/conftest.py): the same bytes (CPU float results depend on the thread count)
    assert metrics == json.loads((root / "metrics.json").read_text())


def test_gpu_tag_limit_is_created_and_updated(server):
    from flows.setup import gpu_slots, set_gpu_limit

    assert gpu_slots(3) == 3 and gpu_slots() >= 1
    assert set_gpu_limit(2) == 2
    assert set_gpu_limit(1) == 1
    with pytest.raises(ValueError, match="at least 1"):
        set_gpu_limit(0)


def test_a_failing_task_names_its_stage_and_inputs_and_is_not_retried_for_bad_input(server, tmp_path):
    from flows.pipeline import moder_pipeline

    broken = full_params({**MINI, "world": {**MINI["world"], "image_size": 32}})  # the micro CLIP takes 16 px
    state = moder_pipeline(
        params_path=str(_write(tmp_path / "bad.yaml", broken)),
        out_dir=str(tmp_path / "out"),
        store=str(tmp_path / "store"),
        dvc_yaml=str(REPO / "dvc.yaml"),
        return_state=True,
    )
    assert state.is_failed()
    with pytest.raises(
        Exception, match=r"backbone failed: world.image_size is 32 but moder-micro-clip takes 16-pixel images"
    ):
        state.result()
    runs = _task_runs(state, expected=len(MINI_STAGES) - 1)  # every stage but `params`
    backbone_run = next(run for run in runs if run.name == "backbone")
    assert backbone_run.run_count == 1  # a bad input is not retried
    # the runs it blocked never start, so Prefect names them after the task, plus 3 hex digits: the stage instance
    blocked = {run.name for run in runs if run.state.name == "NotReady"}
    assert {name[:-4] for name in blocked} == MINI_STAGES - {"params", "scan", "backbone"}
    assert all(re.fullmatch(r"-[0-9a-f]{3}", name[-4:]) for name in blocked)


def test_a_tampered_cache_runs_no_code_and_is_recomputed_with_a_warning(server, tmp_path):
    """A pickle planted where Prefect's own cache and ours would look for the backbone's result: Prefect reads no
    result, our store parses JSON only, so the payload never runs; the record is a miss, named in a warning, and
    the stage runs and replaces it."""
    import pickle

    from prefect.results import ResultRecord

    from flows.graph import pipeline
    from flows.runner import cache_key
    from tests.test_store import MakesMarker, _prefect_result_record

    marker = tmp_path / "marker"
    payload = _prefect_result_record(pickle.dumps(MakesMarker(marker)))
    ResultRecord.deserialize(payload)
    assert marker.exists()  # the payload is live: Prefect runs it when it reads such a result record
    marker.rmdir()

    key = cache_key(pipeline(REPO / "dvc.yaml", FULL)["backbone"], {})
    (server["home"] / "storage").mkdir(exist_ok=True)
    (server["home"] / "storage" / key).write_bytes(payload)  # where Prefect's own cache would look
    record = tmp_path / "store" / "records" / f"{key}.json"
    record.parent.mkdir(parents=True)
    record.write_bytes(payload)  # and where ours looks
    try:
        metrics, states = _run(_write(tmp_path / "params.yaml", FULL), tmp_path / "out", tmp_path / "store")
    finally:
        (server["home"] / "storage" / key).unlink()
    assert not marker.exists() and states["backbone"] == "Completed" and metrics["moder"]
    assert any(f"store miss: {record} is not a valid artifact record" in m for m in _run.logs), _run.logs
    assert json.loads(record.read_text())["files"]  # replaced by the stage's own record


def test_only_transient_failures_are_retried():
    from prefect.states import Failed

    from flows.pipeline import _retry_unless_user_error
    from flows.store import StoreError
    from moder.features import FeatureFileError
    from moder.params import ParamsError

    assert _retry_unless_user_error(None, None, Failed(data=RuntimeError("CUDA error: unspecified launch failure")))
    assert not _retry_unless_user_error(None, None, Failed(data=ParamsError("bad key")))
    assert not _retry_unless_user_error(None, None, Failed(data=FeatureFileError("made by another model")))
    assert not _retry_unless_user_error(None, None, Failed(data=StoreError("blob x does not match its digest")))


def test_prefect_yaml_deploys_to_a_work_pool_whose_worker_runs_the_flow(server, project, tmp_path):
    """prefect.yaml as a user runs it: create the pool, `prefect deploy`, a process worker in the checkout."""
    from prefect.client.orchestration import get_client

    root, _ = project
    shutil.copy(REPO / "prefect.yaml", root / "prefect.yaml")
    bin_dir = Path(sys.executable).parent
    env = {**server["env"], "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    prefect_cli = str(bin_dir / "prefect")

    def cli(*args: str, **extra: str) -> str:
        done = subprocess.run([prefect_cli, *args], cwd=root, env={**env, **extra}, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    cli("work-pool", "create", "moder-gpu", "--type", "process")
    cli("--no-prompt", "deploy", "--name", "moder-gpu", MODER_HOME=str(root))  # the checkout on the workers
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("moder-pipeline/moder-gpu")
    assert deployment.work_pool_name == "moder-gpu" and deployment.entrypoint == "flows/pipeline.py:moder_pipeline"
    assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(root)}}]
    # started outside the checkout: the deployment's pull step goes there
    worker = _start([prefect_cli, "worker", "start", "--pool", "moder-gpu"], tmp_path, env, tmp_path / "worker.log")
    try:
        out = tmp_path / "pooled"
        output = cli(
            "deployment",
            "run",
            "moder-pipeline/moder-gpu",
            "--param",
            f"out_dir={out}",
            "--param",
            f"store={tmp_path / 'store'}",
            "--watch",
        )
        assert "Completed" in output, output + (tmp_path / "worker.log").read_text()[-3000:]
        assert json.loads((out / "metrics.json").read_text()) == json.loads((root / "metrics.json").read_text())
    finally:
        _stop(worker)
