"""The miniature configuration through DVC itself: repro, no-op re-run, exactly-the-right invalidation, metrics, plots."""
import json
from pathlib import Path

import yaml

from moder.params import parse_params
from tests.conftest import FULL, MINI, dvc


def _changed(cwd: Path, params: dict) -> set[str]:
    (cwd / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return set(json.loads(dvc(cwd, "status", "--json").stdout))


def test_repro_runs_every_stage_and_writes_metrics_and_plots(project):
    root, repro = project
    for stage in ("backbone", "extract@a", "extract@b", "train@a", "train@b", "finetune", "evaluate@a", "evaluate@b", "report"):
        assert f"Running stage '{stage}'" in repro.stdout
    metrics = json.loads((root / "metrics.json").read_text())
    assert set(metrics) == {"zeroshot", "finetune", "oracle", "moder"} and set(metrics["moder"]) == {"transfer", "avg", "last"}
    shown = json.loads(dvc(root, "metrics", "show", "--json").stdout)
    assert json.dumps(metrics["moder"]["last"]) in json.dumps(shown)


def test_second_repro_is_a_no_op(project):
    root, _ = project
    assert "Data and pipelines are up to date." in dvc(root, "repro").stdout


def test_plots_render_the_accuracy_heatmap_and_step_curves(project, tmp_path):
    root, _ = project
    dvc(root, "plots", "show", "-o", str(tmp_path / "plots"))
    html = (tmp_path / "plots" / "index.html").read_text()
    assert '"mark": "rect"' in html.replace("'", '"') or '"rect"' in html
    assert "tasks not yet trained" in html and "zeroshot" in html


def test_each_change_invalidates_exactly_the_stages_that_read_it(project):
    """`dvc status` lists the stages a change touches directly; their outputs then carry it downstream."""
    root, _ = project
    evaluation = {"evaluate@a", "evaluate@b"}
    assert _changed(root, {**FULL, "retrieval": {**FULL["retrieval"], "k": 2}}) == evaluation
    assert _changed(root, {**FULL, "train": {**FULL["train"], "lr": 0.01}}) == {"train@a", "train@b", "finetune"}
    extra = parse_params({**MINI, "datasets": {"c": {"classes": 3}}, "tasks": {"c": {"dataset": "c"}}}).model_dump(mode="json")
    appended = {**FULL, "datasets": {**FULL["datasets"], **extra["datasets"]}, "tasks": {**FULL["tasks"], **extra["tasks"]}}
    # appending a task trains only the new dataset's experts; evaluation, the sequential finetune
    # baseline and report read the task list
    assert _changed(root, appended) == {"extract@c", "train@c", "finetune", "evaluate@c", "report"} | evaluation
    assert _changed(root, FULL) == set()


def test_exp_run_with_a_new_k_reruns_only_evaluation_and_report(project):
    root, _ = project
    result = dvc(root, "exp", "run", "-S", "retrieval.k=2")
    ran = {line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage")}
    # report re-runs only if an evaluation output changed (with this tiny model it may not)
    assert {"evaluate@a", "evaluate@b"} <= ran <= {"evaluate@a", "evaluate@b", "report"}
