"""Every stage on a very small configuration, called as functions and as CLIs."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from moder.compose import smooth_toward_zeroshot
from moder.experts import load_experts
from moder.features import FeatureFileError, read_features
from moder.io import file_digest
from moder.metrics import accuracy, summarize
from moder.params import parse_params
from moder.results import METHODS
from stages.backbone import backbone
from stages.report import read_matrices
from stages.train import train
from tests.conftest import DATA, MINI, MODEL, merged, run_pipeline, stage_cli
from tests.layouts import imagefolder

REPO = Path(__file__).resolve().parents[1]

MINI_CLASSIL = {
    **MINI,
    "benchmark": {"name": "mini-classil", "preset": "mini-classil", "protocol": "classil"},
    "datasets": {"p": {"splits": 3, "tint": 0.2}},
    "tasks": {
        "p1": {"dataset": "p", "split": 1},
        "p2": {"dataset": "p", "split": 2},
        "p3": {"dataset": "p", "split": 3},
    },
}
CLASSIL_DATA = Path("data") / "mini-classil"


def _all_names(path: Path) -> dict[tuple[str, str], float]:
    """An evaluation file's accuracy per (task, method), over each task's whole test set."""
    return {(r["task"], r["method"]): r["accuracy"] for r in pq.read_table(path).to_pylist() if r["names"] == "all"}


def test_pretrain_writes_a_loadable_checkpoint_and_its_accuracy(mtil_run):
    """The saved backbone, loaded back as every later stage loads it, scores the accuracy its summary reports."""
    from moder.pretrain import clean_accuracy
    from moder.text import TextTower
    from moder.world import World
    from stages.files import load_frozen_clip

    root, _ = mtil_run
    summary = json.loads((root / "reports" / "backbone.json").read_text())
    assert set(summary) == {"clean_zeroshot_accuracy", "final_loss"}
    params = parse_params(MINI)
    clip = load_frozen_clip(params, root / MODEL)
    world, pretrain = World.of(params.world, params.seed), params.pretrain
    tower = TextTower(clip.model, clip.tokenizer)
    mean, std = clip.identity.mean, clip.identity.std
    accuracy = clean_accuracy(clip.model, tower, world, pretrain.domain, pretrain.captions, mean, std, params.seed)
    assert round(accuracy, 2) == summary["clean_zeroshot_accuracy"]


def test_extract_writes_features_per_split_with_the_model_identity(mtil_run):
    root, _ = mtil_run
    digest = file_digest(root / MODEL)
    train_split = read_features(root / DATA / "features" / "b" / "train.parquet")
    test_split = read_features(root / DATA / "features" / "b" / "test.parquet")
    classes = read_features(root / DATA / "features" / "b" / "classes.parquet")
    assert json.loads(train_split.model)["weights"] == f"file:{digest[:16]}"
    assert train_split.dataset == "b" and len(train_split.class_names) == 5
    assert np.bincount(train_split.labels.numpy()).tolist() == [4] * 5  # balanced
    assert np.bincount(test_split.labels.numpy()).tolist() == [3] * 5
    assert classes.vectors.shape == (5, 32) and torch.allclose(classes.vectors.norm(dim=1), torch.ones(5))
    assert set(classes.class_names) <= {
        f"{c} {s}" for c in ("red", "green", "blue") for s in ("circle", "square", "star")
    }


def test_train_writes_one_expert_per_class_of_its_task(mtil_run):
    root, _ = mtil_run
    classes = read_features(root / DATA / "features" / "a" / "classes.parquet")
    experts, names, extra, _ = load_experts(root / DATA / "experts" / "a" / "split-1.safetensors")
    assert names == classes.class_names and len(experts) == 4
    assert set(extra) == {"dataset", "split", "offsets"} and (extra["dataset"], extra["split"]) == ("a", 1)
    assert len(extra["offsets"]) == 4


def test_evaluate_scores_zeroshot_as_the_frozen_model_and_report_summarizes_the_rows(mtil_run):
    root, figures = mtil_run
    params = parse_params(MINI)
    rows = pq.read_table(root / DATA / "eval" / "a.parquet").to_pylist()
    scored = ("zeroshot", "oracle", "moder", "no_composition", "no_calibration")
    assert {(r["task"], r["method"]) for r in rows} == {(t, m) for t in "ab" for m in scored}
    # zero-shot on task b, recomputed here from the feature files alone
    test = read_features(root / DATA / "features" / "b" / "test.parquet")
    prototypes = read_features(root / DATA / "features" / "b" / "classes.parquet").vectors
    expected = accuracy(test.vectors, test.labels, prototypes)
    zeroshot_b = [r["accuracy"] for r in rows if (r["task"], r["method"], r["names"]) == ("b", "zeroshot", "all")]
    assert zeroshot_b == [pytest.approx(expected)]
    found = read_matrices(params, root / DATA / "eval", root / DATA / "finetune.parquet")
    matrices = {m: a for (m, names), a in found.items() if names == "all"}
    methods = {m: {k: round(v, 2) for k, v in summarize(a, "mtil").items()} for m, a in matrices.items()}
    # every method's metrics, then Transfer over new and over recurring names (task b after step a)
    for m in methods:
        assert {k: figures[m][k] for k in methods[m]} == methods[m]
        assert (figures[m]["transfer_new"], figures[m]["transfer_recurring"]) == tuple(
            round(float(found[(m, names)][0, 1]), 2) for names in ("new", "recurring")
        )
    assert set(figures) == {*methods, "composition", "calibration", "headroom", "hub"}
    assert figures["composition"]["transfer_new"] == round(
        figures["moder"]["transfer_new"] - figures["no_composition"]["transfer_new"], 2
    )
    assert json.loads((root / "metrics.json").read_text()) == figures
    cells = json.loads((root / "reports" / "accuracy.json").read_text())
    assert len(cells) == 5 * 4 and {c["step"] for c in cells} == {"1. a", "2. b"}
    methods = ("zeroshot", "finetune", "oracle", "no_composition", "moder")
    assert [c["method"] for c in cells[::4]] == list(methods)
    seen = "".join(
        f"{i + 1}. {t},{m},{matrices[m][i, : i + 1].mean():.2f}\n" for i, t in enumerate("ab") for m in methods
    )
    assert (root / "reports" / "seen.csv").read_text() == "step,method,accuracy\n" + seen
    unseen = "".join(f"1. a,{m},{matrices[m][0, 1]:.2f}\n" for m in methods)
    assert (root / "reports" / "unseen.csv").read_text() == "step,method,accuracy\n" + unseen
    deltas = json.loads((root / "reports" / "delta.json").read_text())
    assert (
        deltas[1]
        == {
            "step": "1. a",
            "task": "2. b",
            "delta": round(float(matrices["moder"][0, 1] - matrices["zeroshot"][0, 1]), 2),
        }
        and len(deltas) == 4
    )


def test_same_seed_gives_identical_metrics(mtil_run, tmp_path):
    root, _ = mtil_run
    run_pipeline(MINI, tmp_path)
    assert (tmp_path / "metrics.json").read_bytes() == (root / "metrics.json").read_bytes()


def test_appending_a_task_leaves_the_earlier_hubs_and_experts_byte_identical(mtil_run, tmp_path):
    """The earlier hubs re-run (they read the task list and every dataset's experts) but give the same bytes, so
    nothing reads them anew; the earlier datasets' experts do not depend on the new one."""
    root, _ = mtil_run
    run_pipeline(merged(MINI, {"datasets": {"c": {"classes": 3}}, "tasks": {"c": {"dataset": "c"}}}), tmp_path)
    for path in ("hub/a.parquet", "hub/b.parquet", "experts/a/split-1.safetensors", "experts/b/split-1.safetensors"):
        assert (tmp_path / DATA / path).read_bytes() == (root / DATA / path).read_bytes(), path
    assert (tmp_path / DATA / "hub" / "c.parquet").is_file()


def test_classil_label_spaces_grow_with_the_steps(tmp_path):
    figures = run_pipeline(MINI_CLASSIL, tmp_path)
    # Class-IL: one dataset, so every name of a task not yet trained is new
    assert set(figures["zeroshot"]) == {"transfer", "transfer_new", "avg", "last", "future"}
    assert all(figures[m]["transfer_new"] == figures[m]["transfer"] for m in ("zeroshot", "moder", "oracle"))
    data = tmp_path / "data" / "mini-classil"
    test = read_features(data / "features" / "p" / "test.parquet")
    classes = read_features(data / "features" / "p" / "classes.parquet")
    experts, names, _, _ = load_experts(data / "experts" / "p" / "split-1.safetensors")
    own = torch.tensor([classes.class_names.index(n) for n in names])
    keep = torch.isin(test.labels, own)
    remap = torch.full((9,), -1)
    remap[own] = torch.arange(3)
    among_seen = accuracy(test.vectors[keep], remap[test.labels[keep]], classes.vectors[own])  # after step 1
    among_all = accuracy(test.vectors[keep], test.labels[keep], classes.vectors)  # task 1 before... all classes
    rows = {s: pq.read_table(data / "eval" / f"{s}.parquet").to_pylist() for s in ("p1", "p3")}
    pick = lambda step: next(  # noqa: E731
        r["accuracy"] for r in rows[step] if (r["task"], r["method"], r["names"]) == ("p1", "zeroshot", "all")
    )
    assert pick("p1") == pytest.approx(among_seen) and pick("p3") == pytest.approx(among_all)


def test_features_made_by_another_model_are_refused(mtil_run, tmp_path):
    root, _ = mtil_run
    params = parse_params({**MINI, "seed": 1})
    other = tmp_path / "other.safetensors"
    backbone(params, other, tmp_path / "backbone.json")
    with pytest.raises(FeatureFileError, match=r"features/a/train.parquet was made by another model"):
        train(params, "a", other, root / DATA / "features", tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_missing_dataset_features_name_the_file(mtil_run, tmp_path):
    root, _ = mtil_run
    with pytest.raises(FeatureFileError, match=r"feature file not found: .*empty/b/train.parquet"):
        train(parse_params(MINI), "b", root / MODEL, tmp_path / "empty", tmp_path / "b")


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"retrieval": {"k": 0}},
            "error: params.yaml: invalid params\n  key 'retrieval.k': Input should be greater than or equal to 1",
        ),
        ({"tasks": {"a": {"dataset": "zzz"}}}, "tasks.a.dataset: unknown dataset 'zzz'; datasets: a, b"),
        (
            {"datasets": {"a": {"classes": 4, "background": [0.8, 0.2]}, "b": {}}},
            "key 'datasets.a.background': need 0 <= low <= high <= 1 (got [0.8, 0.2])",
        ),
    ],
)
def test_cli_reports_bad_params_naming_the_key(tmp_path, change, message):
    """Every stage's command line loads the params first (stages.common.run_cli); scan's imports are the lightest."""
    result = stage_cli("scan", {**copy.deepcopy(MINI), **change}, tmp_path, "--out", "scans")
    assert result.returncode == 1 and message in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "scans").exists()


def test_cli_reports_a_missing_pretrained_model(tmp_path):
    result = stage_cli(
        "extract",
        MINI,
        tmp_path,
        "--dataset",
        "a",
        "--model",
        "data/backbone/clip.safetensors",
        "--out",
        "data/features/a",
    )
    assert result.returncode == 1
    assert "error: backbone CLIP not found: data/backbone/clip.safetensors (run the backbone stage" in result.stderr
    assert not (tmp_path / "data" / "features").exists()


def test_summary_refuses_reports_of_another_task_list(mtil_run, tmp_path):
    root, _ = mtil_run
    renamed = {
        **MINI,
        "datasets": {"a": {"classes": 4}, "c": {}},
        "tasks": {"a": {"dataset": "a"}, "c": {"dataset": "c"}},
    }
    metrics = ("--metrics", str(root / "metrics.json"))
    result = stage_cli("report", renamed, tmp_path, "--summary-only", "--reports", str(root / "reports"), *metrics)
    assert (
        result.returncode == 1
        and "accuracy.json does not cover the tasks in params.yaml (a, c): run dvc repro" in result.stderr
    )
    shown = stage_cli("report", MINI, tmp_path, "--summary-only", "--reports", str(root / "reports"), *metrics)
    assert (
        shown.returncode == 0 and "Transfer" in shown.stdout and f"retrieval k={MINI['retrieval']['k']}" in shown.stdout
    )
    figures = json.loads((root / "metrics.json").read_text())
    transfer = "".join(
        f"{figures[m]['transfer']:>10.1f}"
        for m in ("zeroshot", "finetune", "oracle", "no_composition", "no_calibration", "moder")
    )
    assert f"Transfer      {transfer}" in shown.stdout
    assert f"{figures['composition']['transfer']:>+8.1f}{figures['calibration']['transfer']:>+8.1f}" in shown.stdout
    no_metrics = stage_cli("report", MINI, tmp_path, "--summary-only", "--reports", str(root / "reports"))
    assert no_metrics.returncode == 1 and "metrics.json not found: run the pipeline first" in no_metrics.stderr
    hub = json.loads((root / "metrics.json").read_text())["hub"]
    assert f"hub after the last step: {hub['parameters']:,} trainable parameters" in shown.stdout


def test_lora_experts_and_output_space_composition_run_through_the_stages(tmp_path):
    changes = {
        "expert": {"lora": {"rank": 2, "alpha": 4.0, "layers": [1]}},
        "composition": {"space": "output"},
        "retrieval": {"k": 2, "null_score": 0.5},
    }
    figures = run_pipeline(merged(MINI, changes), tmp_path)
    experts, _, _, _ = load_experts(tmp_path / DATA / "experts" / "b" / "split-1.safetensors")
    assert (
        experts.kind == "lora"
        and experts.rank == 2
        and set(experts.a) == {"1.attn_in", "1.attn_out", "1.mlp_fc", "1.mlp_proj"}
    )
    assert set(figures) == {*METHODS, "composition", "calibration", "headroom", "hub"}
    per_class = sum(p[0].numel() for p in experts.parameters())  # what one class's expert trains
    classes = sum(spec["classes"] for spec in MINI["datasets"].values())
    assert figures["hub"]["classes"] == classes and figures["hub"]["parameters"] == classes * per_class


def test_unseen_class_report_explains_each_composed_prototype(mtil_run):
    root, _ = mtil_run
    lines = (root / "reports" / "unseen_classes.csv").read_text().splitlines()
    assert lines[0] == "step,task,class,names,zeroshot,moder,diff,similarity,retrieved"
    rows = [line.split(",") for line in lines[1:]]
    names = read_features(root / DATA / "features" / "b" / "classes.parquet").class_names
    task_a = read_features(root / DATA / "features" / "a" / "classes.parquet").class_names
    # after step a, task b is unseen: each class's name is recurring if task a trained it
    expected = [("a", "b", name, "recurring" if name in task_a else "new") for name in names]
    assert [tuple(r[:4]) for r in rows] == expected and {r[3] for r in rows} == {"new", "recurring"}
    for row in [r[:3] + r[4:] for r in rows]:
        entries = row[7].split("; ")
        assert len(entries) == min(MINI["retrieval"]["k"], len(task_a))  # the hub's classes, at most k; no null expert
        assert all(entry.rsplit(" [", 1)[0] in task_a and entry.split("] ")[0].endswith("[a") for entry in entries)
        assert sum(float(entry.rsplit(" ", 1)[1]) for entry in entries) == pytest.approx(1.0, abs=2e-3)
        assert float(row[5]) == pytest.approx(float(row[4]) - float(row[3]), abs=0.011)
        assert -1 <= float(row[6]) <= 1
    # a balanced test set: the mean of the per-class accuracies is the task's accuracy
    task_rows = pq.read_table(root / DATA / "eval" / "a.parquet").to_pylist()
    for column, method in ((4, "zeroshot"), (5, "moder")):
        for names in ("all", "new", "recurring"):
            task_accuracy = next(
                r["accuracy"] for r in task_rows if (r["task"], r["method"], r["names"]) == ("b", method, names)
            )
            group = [float(r[column]) for r in rows if names in ("all", r[3])]
            assert sum(group) / len(group) == pytest.approx(task_accuracy, abs=0.01)


def test_oracle_scores_every_task_with_its_own_experts_and_equals_moder_once_trained(mtil_run):
    root, _ = mtil_run
    after_a, after_b = (_all_names(root / DATA / "eval" / f) for f in ("a.parquet", "b.parquet"))
    assert after_a[("a", "oracle")] == after_a[("a", "moder")]
    assert after_b[("b", "oracle")] == after_b[("b", "moder")]
    # before b is trained, the oracle scores b with b's own experts (stored by train@b), smoothed toward zero-shot
    # by alpha_unseen as MoDER's composed prototypes are; in MTIL calibration shifts all of b's classes alike
    _, _, _, own = load_experts(root / DATA / "experts" / "b" / "split-1.safetensors")
    classes = read_features(root / DATA / "features" / "b" / "classes.parquet")
    test = read_features(root / DATA / "features" / "b" / "test.parquet")
    perfect = smooth_toward_zeroshot(own, classes.vectors, MINI["composition"]["alpha_unseen"])
    assert after_a[("b", "oracle")] == pytest.approx(accuracy(test.vectors, test.labels, perfect))


def test_finetune_baseline_scores_every_task_after_every_step(mtil_run):
    root, figures = mtil_run
    rows = pq.read_table(root / DATA / "finetune.parquet").to_pylist()
    # every task after every step, and task b before it is trained over its new and its recurring names too
    assert sorted((r["step"], r["task"], r["names"]) for r in rows) == [
        ("a", "a", "all"),
        ("a", "b", "all"),
        ("a", "b", "new"),
        ("a", "b", "recurring"),
        ("b", "a", "all"),
        ("b", "b", "all"),
    ]
    assert {r["method"] for r in rows} == {"finetune"}
    assert set(figures["finetune"]) == {"transfer", "transfer_new", "transfer_recurring", "avg", "last"}


def test_negatives_read_the_stored_prototypes_of_earlier_tasks_and_the_untrained_zeroshot_ones(tmp_path):
    from moder.features import FeatureTable
    from moder.tasks import Task
    from stages.train import negatives_and_anchors

    classes = FeatureTable(torch.eye(6), torch.arange(6), [str(i) for i in range(6)], "p", "m")
    tasks = [Task("p split 1", 1, "p", [0, 1]), Task("p split 2", 2, "p", [2, 3]), Task("p split 3", 3, "p", [4, 5])]
    stored = {0: torch.full((6,), 7.0), 1: torch.full((6,), 8.0)}
    centroids = {0: torch.full((6,), 0.5), 1: torch.full((6,), 0.25)}
    for mode, first, second in (
        ("none", None, None),
        ("earlier", None, [7.0, 8.0]),
        ("dataset", [2, 3, 4, 5], [7.0, 8.0, 4, 5]),
    ):
        params = parse_params(merged(MINI_CLASSIL, {"train": {"negatives": mode, "anchor_earlier": 0.0}}))
        got, anchors = negatives_and_anchors(params, tasks[0], [], {}, {}, classes)
        assert (got is None) if first is None else torch.equal(got, torch.eye(6)[first])
        assert anchors is None  # no earlier split
        got, anchors = negatives_and_anchors(params, tasks[1], tasks[:1], stored, centroids, classes)
        if second is None:
            assert got is None and anchors is None
        else:
            expected = [torch.full((6,), v) if isinstance(v, float) else torch.eye(6)[v] for v in second]
            assert torch.equal(got, torch.stack(expected))
            # each earlier class's centroid is anchored to its own stored prototype's column
            features, columns = anchors
            assert torch.equal(features, torch.stack([centroids[0], centroids[1]]))
            assert torch.equal(got[columns], torch.stack([stored[0], stored[1]]))


def test_calibration_changes_only_label_spaces_that_mix_trained_and_untrained_classes(tmp_path):
    train = {"negatives": "dataset", "anchor_earlier": 0.0}
    plain = run_pipeline(
        merged(MINI_CLASSIL, {"train": train, "composition": {"calibrate": "none"}}), tmp_path / "plain"
    )
    calibrated = run_pipeline(
        merged(MINI_CLASSIL, {"train": train, "composition": {"calibrate": "mean"}}), tmp_path / "calibrated"
    )
    assert plain["moder"]["last"] == calibrated["moder"]["last"]  # every class trained: one shared offset, no change
    # MoDER without calibration is exactly MoDER run with calibration off: calibration is all that differs
    assert calibrated["no_calibration"] == plain["moder"] == plain["no_calibration"]
    for step in ("p1", "p2", "p3"):
        rows = _all_names(tmp_path / "plain" / CLASSIL_DATA / "eval" / f"{step}.parquet")
        moved = _all_names(tmp_path / "calibrated" / CLASSIL_DATA / "eval" / f"{step}.parquet")
        trained = ["p1", "p2", "p3"][: ["p1", "p2", "p3"].index(step) + 1]
        for task in trained:
            assert rows[(task, "moder")] == moved[(task, "moder")]
        assert all(rows[(t, "zeroshot")] == moved[(t, "zeroshot")] for t in ("p1", "p2", "p3"))
    # the oracle is MoDER with perfect retrieval: calibrated the same way, so it moves where MoDER moves
    assert plain["oracle"]["last"] == calibrated["oracle"]["last"] == calibrated["moder"]["last"]


def test_per_task_calibration_applies_to_the_oracle_and_to_every_trained_class(tmp_path):
    train = {"negatives": "earlier", "anchor_earlier": 0.0}
    plain = run_pipeline(
        merged(MINI_CLASSIL, {"train": train, "composition": {"calibrate": "none"}}), tmp_path / "plain"
    )
    per_class = run_pipeline(
        merged(MINI_CLASSIL, {"train": train, "composition": {"calibrate": "task"}}), tmp_path / "task"
    )
    assert per_class["zeroshot"] == plain["zeroshot"]
    assert (
        per_class["moder"]["last"] == per_class["oracle"]["last"]
    )  # every class trained: the same prototypes and offsets


def test_a_stage_outside_the_project_environment_says_how_to_run_it(tmp_path):
    """`python -S` has no site-packages: what a python without the project's packages sees."""
    result = subprocess.run(
        [sys.executable, "-S", "-m", "stages.train", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: {sys.executable} cannot import torch, open_clip, pyarrow, pydantic, yaml: the stages need the "
        'project\'s environment. Run `make venv`, then PATH="$PWD/.venv/bin:$PATH" dvc repro (or make run)'
    ]


def test_the_params_stage_finds_every_image_dataset_before_any_stage_runs(tmp_path):
    root = tmp_path / "shapes"
    imagefolder.write(root, n_classes=2, per_class=2)
    data = {
        **MINI,
        "datasets": {"a": {"classes": 4}, "mine": {"source": "imagefolder", "root": str(root)}},
        "tasks": {"a": {"dataset": "a"}, "mine": {"dataset": "mine"}},
    }
    found = stage_cli("check_params", data, tmp_path)
    assert found.returncode == 0, found.stderr
    assert found.stdout.splitlines()[1] == f"  datasets.mine: 4 train, 4 test images under {root}"
    missing = {**data, "datasets": {**data["datasets"], "mine": {"source": "imagefolder", "root": str(tmp_path / "x")}}}
    result = stage_cli("check_params", missing, tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: datasets.mine: imagefolder: dataset root {tmp_path / 'x'} does not exist. Download the dataset "
        "there (see docs/datasets.md for its layout), or set datasets.<name>.root in params.yaml to where it "
        "already is."
    ]


def test_per_task_calibration_changes_nothing_where_each_label_space_is_one_task(mtil_run, tmp_path):
    """MTIL: a task is classified among its own classes, all trained or all composed, so lowering every class
    of a task by the same offset cannot reorder anything."""
    _, plain = mtil_run
    calibrated = run_pipeline(merged(MINI, {"composition": {"calibrate": "task"}}), tmp_path)
    assert calibrated["moder"] == plain["moder"] and calibrated["oracle"] == plain["oracle"]
