"""The miniature configuration through DVC itself: repro, no-op re-run, exact invalidation, metrics, plots, kills."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from flows.graph import pipeline
from flows.runner import run_call
from moder.features import read_features
from moder.params import parse_params
from moder.results import METHODS
from stages.compose import compose_text
from tests.conftest import (
    ALWAYS_RUN,
    DATA,
    FULL,
    MINI,
    MINI_B,
    MINI_STAGES,
    MODEL,
    REPO,
    dvc,
    params_text,
    ran_stages,
    run_command,
    stale_stages,
)

pytestmark = pytest.mark.slow  # a DVC project or a Prefect server: the slow tier


def _changed(cwd: Path, params: dict) -> set[str]:
    (cwd / "params.yaml").write_text(params_text(params))
    return stale_stages(cwd)


def test_repro_runs_every_stage_and_writes_metrics_and_plots(project):
    root, repro = project
    for stage in MINI_STAGES:
        assert f"Running stage '{stage}'" in repro.stdout
    metrics = json.loads((root / "metrics.json").read_text())
    assert set(metrics) == {*METHODS, "composition", "calibration", "headroom", "hub"}
    assert set(metrics["moder"]) == {"transfer", "transfer_new", "transfer_recurring", "avg", "last"}
    shown = json.loads(dvc(root, "metrics", "show", "--json").stdout)
    assert json.dumps(metrics["moder"]["last"]) in json.dumps(shown)


def test_second_repro_is_a_no_op(project):
    root, _ = project
    assert ran_stages(dvc(root, "repro").stdout) == ALWAYS_RUN  # it lists files; nothing changed, nothing else runs


def test_plots_render_the_accuracy_heatmap_and_step_curves(project):
    """The specs DVC renders hold the run's own numbers: the heatmap one rect per method, step and task, the
    curves one point per step and method."""
    root, _ = project
    plots = json.loads(dvc(root, "plots", "show", "--json").stdout)["data"]
    heatmap = plots["reports/accuracy.json"][0]["content"]
    cells = json.loads((root / "reports" / "accuracy.json").read_text())
    assert heatmap["spec"]["layer"][0]["mark"] == "rect"
    values = [{k: v[k] for k in ("method", "step", "task", "accuracy")} for v in heatmap["data"]["values"]]
    assert values == cells and {c["method"] for c in cells} == {
        "zeroshot",
        "finetune",
        "oracle",
        "no_composition",
        "moder",
    }
    unseen = plots["reports/unseen.csv"][0]["content"]
    assert unseen["title"] == "Mean accuracy over the tasks not yet trained (Transfer)"
    assert [(v["step"], v["method"]) for v in unseen["data"]["values"]] == [
        ("1. a", m) for m in ("zeroshot", "finetune", "oracle", "no_composition", "moder")
    ]


def test_each_change_invalidates_exactly_the_stages_that_read_it(project):
    """`dvc status` lists the stages a change touches directly; their outputs then carry it downstream."""
    root, _ = project
    evaluation = {"evaluate@a", "evaluate@b", "params"}  # `params` validates the whole file at any change
    hubs = {"hub@a", "hub@b"}  # they keep the settings they compose with, for `moder classify`
    assert _changed(root, {**FULL, "retrieval": {**FULL["retrieval"], "k": 2}}) == evaluation | hubs
    # a few-shot draw: the features onward, not the backbone nor the scans
    assert _changed(root, {**FULL, "extract": {**FULL["extract"], "shots": 2}}) == {"extract@a", "extract@b", "params"}
    assert _changed(root, {**FULL, "train": {**FULL["train"], "lr": 0.01}}) == {
        "train@a",
        "train@b",
        "finetune",
        "params",
    }
    extra = parse_params({**MINI, "datasets": {"c": {"classes": 3}}, "tasks": {"c": {"dataset": "c"}}}).model_dump(
        mode="json"
    )
    appended = {
        **FULL,
        "datasets": {**FULL["datasets"], **extra["datasets"]},
        "tasks": {**FULL["tasks"], **extra["tasks"]},
    }
    # appending a task trains only the new dataset's experts; evaluation, the sequential finetune
    # baseline and report read the task list
    new = {"extract@c", "train@c", "finetune", "hub@c", "evaluate@c", "report"}
    assert _changed(root, appended) == new | evaluation | hubs
    assert _changed(root, FULL) == set()


def test_a_few_shot_draw_is_the_same_under_dvc_and_the_flow(project, tmp_path):
    """`dvc repro` runs extract@a as its own process, from dvc.yaml; the flow's runner (flows/runner.py, what each
    Prefect task runs) runs the same stage instance in this process: the same images kept, recorded alike."""
    root, _ = project
    few = {**FULL, "extract": {**FULL["extract"], "shots": 2}}
    (root / "params.yaml").write_text(params_text(few))
    try:
        dvc(root, "repro", "--single-item", "extract@a")
        by_dvc = read_features(root / DATA / "features" / "a" / "train.parquet")
    finally:  # the workspace back at the fixture's committed run
        run_command(["git", "checkout", "--", "params.yaml", "dvc.lock"], root)
        dvc(root, "checkout")
    flow_root = tmp_path / "flow"
    (flow_root / MODEL).parent.mkdir(parents=True)
    shutil.copy(root / MODEL, flow_root / MODEL)
    params = parse_params(few)
    run_call(pipeline(REPO / "dvc.yaml", params.model_dump(mode="json"))["extract@a"], params, flow_root)
    by_flow = read_features(flow_root / DATA / "features" / "a" / "train.parquet")
    assert by_dvc.shots == by_flow.shots == 2 and len(by_dvc.kept) == 2 * FULL["datasets"]["a"]["classes"]
    assert by_dvc.kept == by_flow.kept and torch.equal(by_dvc.labels, by_flow.labels)
    assert torch.allclose(by_dvc.vectors, by_flow.vectors, atol=1e-6)


def test_switching_the_benchmark_makes_stale_only_what_reads_the_change(project):
    """The other preset of the same benchmark (mini-mtil-b shifts dataset b otherwise), as `dvc exp run -S
    benchmark=mini-mtil-b` composes it: its features and experts are made again and everything that reads them
    (hubs and evaluation read every dataset's features); the backbone and dataset a's are kept."""
    root, _ = project
    switched = yaml.safe_load(compose_text(root / "conf", ["benchmark=mini-mtil-b"]))
    assert switched == {**FULL, "benchmark": {**FULL["benchmark"], "preset": "mini-mtil-b"}, "datasets": MINI_B}
    # report re-runs too, through the evaluation outputs (dvc status lists the stages whose own deps changed)
    assert _changed(root, switched) == MINI_STAGES - {"backbone", "scan", "extract@a", "train@a", "report"}
    assert _changed(root, FULL) == set()


def test_a_benchmark_sweep_queues_one_experiment_per_preset(project):
    root, _ = project
    dvc(root, "exp", "run", "--queue", "-S", "benchmark=mini-mtil,mini-mtil-b", "-S", "retrieval.k=2")
    try:
        shown = json.loads(dvc(root, "exp", "show", "--json").stdout)
        queued = [
            experiment["revs"][0]["data"]["params"]["params.yaml"]["data"]
            for baseline in shown
            for experiment in baseline.get("experiments") or []
            if (experiment.get("executor") or {}).get("state") == "queued"
        ]
        assert sorted((p["benchmark"]["preset"], p["retrieval"]["k"]) for p in queued) == [
            ("mini-mtil", 2),
            ("mini-mtil-b", 2),
        ]
        assert {p["datasets"]["b"].get("outline") for p in queued} == {0.5, 0.2}
    finally:
        dvc(root, "queue", "remove", "--queued")


def test_a_typo_anywhere_fails_repro_even_when_no_stage_reads_the_section(project):
    root, _ = project
    text = (root / "params.yaml").read_text()
    (root / "params.yaml").write_text(text.replace("retrieval:", "retreival:", 1))
    try:
        assert json.loads(dvc(root, "status", "--json").stdout).keys() >= {"params"}
        result = run_command([str(Path(sys.executable).parent / "dvc"), "repro"], root, check=False)
        assert result.returncode != 0 and "unknown key 'retreival'" in result.stdout + result.stderr
        assert "Running stage 'backbone'" not in result.stdout
    finally:
        (root / "params.yaml").write_text(text)
    assert ran_stages(dvc(root, "repro").stdout) == ALWAYS_RUN  # it lists files; nothing changed, nothing else runs


# a stage writing a directory (atomic_directory) and one writing a group of files together (atomic_files): every
# stage writes through one of the two, and tests/test_reliability.py checks each write on its own
@pytest.mark.parametrize("stage", ["train@b", "report"])
def test_a_stage_killed_midway_is_redone_by_the_next_repro_with_the_same_results(project, stage):
    """kill -9 of the whole process group a moment into the stage; the next `dvc repro` redoes it,
    the results are byte-identical and DVC sees nothing left over."""
    root, _ = project
    metrics = (root / "metrics.json").read_bytes()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "dvc"), "repro", "-f", "-s", stage],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    for line in process.stdout:
        if f"Running stage '{stage}'" in line:
            break
    time.sleep(1.5)  # into the stage's own work (its imports take about a second)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    dvc(root, "repro")
    assert (root / "metrics.json").read_bytes() == metrics
    assert stale_stages(root) == set()
    assert not [p for p in root.rglob("*.tmp") if ".git" not in p.parts and ".dvc" not in p.parts]
