"""Stage `report`: the accuracy matrices as metrics.json (Transfer/Avg/Last per method), plot data and a summary."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moder.experts import ExpertFileError
from moder.hub import HubCost, HubFileError, hub_cost
from moder.io import atomic_files, csv_text
from moder.params import Params
from moder.results import METHODS, AccuracyRow, UnseenClassRow, accuracy_matrices, effects, method_figures
from stages.common import MissingInput, parser, path_with_suffix, run_cli

USES_DEVICE = False

Matrices = dict[tuple[str, str], np.ndarray]  # (method, names) -> A[i][j], moder.results.accuracy_matrices


def read_matrices(params: Params, evaluation: Path, finetune: Path) -> Matrices:
    """A[i][j] per (method, names): accuracy on task j after step i, from each step's evaluation rows and the
    finetune baseline's rows; every method's matrix over all images must be complete."""
    tasks = list(params.tasks)
    sources = [(evaluation / f"{step}.parquet", f"evaluate@{step}") for step in tasks] + [(finetune, "finetune")]
    rows = []
    for path, stage in sources:
        if not path.is_file():
            raise MissingInput(f"evaluation rows not found: {path} (run {stage})")
        rows += [AccuracyRow(**r) for r in _read_rows(path, stage, AccuracyRow)]
    matrices = accuracy_matrices(rows, tasks)
    for method in METHODS:
        matrix = matrices.get((method, "all"), np.full((len(tasks), len(tasks)), np.nan))
        missing = [f"{tasks[i]}/{tasks[j]}" for i, j in zip(*np.nonzero(np.isnan(matrix)), strict=True)]
        if missing:
            raise MissingInput(
                f"no {method} accuracy for step/task {', '.join(missing[:5])} in {evaluation}; "
                "re-run the evaluate and finetune stages (dvc repro)"
            )
    return matrices


def _read_rows(path: Path, stage: str, row_type: type) -> list[dict]:
    """A stage's rows (of `row_type`'s columns) as dicts, or one line naming the file and the stage to re-run."""
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise MissingInput(f"{path}: not a readable Parquet file ({error}) [written by {stage}: re-run it]") from None
    columns = [f.name for f in fields(row_type)]
    if table.column_names != columns:
        raise MissingInput(f"{path}: columns {table.column_names}, not {columns} [written by {stage}: re-run it]")
    return table.to_pylist()


def metrics_of(params: Params, matrices: Matrices) -> dict[str, dict[str, float]]:
    """metrics.json's figures: every method's, then the effects that separate the causes of MoDER's gain."""
    figures = {m: method_figures(matrices, m, params.benchmark.protocol) for m in METHODS}
    return {**figures, **effects(figures)}


def unseen_class_rows(params: Params, unseen: Path) -> list[list]:
    """Every class not yet trained after each step: zero-shot vs composed accuracy, the similarity of its
    closest hub class (what the gate reads) and what was retrieved."""
    rows: list[list] = [["step", "task", "class", "names", "zeroshot", "moder", "diff", "similarity", "retrieved"]]
    for step in params.tasks:
        path = unseen / f"{step}.parquet"
        if not path.is_file():
            raise MissingInput(f"per-class report not found: {path} (run evaluate@{step})")
        for row in _read_rows(path, f"evaluate@{step}", UnseenClassRow):
            rows.append(
                [
                    row["step"],
                    row["task"],
                    row["class_name"],
                    row["names"],
                    f"{row['zeroshot']:.2f}",
                    f"{row['moder']:.2f}",
                    f"{row['moder'] - row['zeroshot']:+.2f}",
                    f"{row['similarity']:.4f}",
                    row["retrieved"],
                ]
            )
    return rows


# the methods drawn (reports/accuracy.json, seen.csv, unseen.csv); MoDER without calibration is only a figure
PLOTTED = ("zeroshot", "finetune", "oracle", "no_composition", "moder")


def step_curves(tasks: list[str], matrices: dict[str, np.ndarray]) -> dict[str, list[list]]:
    """Mean accuracy after each step over the tasks already trained ("seen") and those not yet ("unseen"),
    one row per step and method (the plots colour by method)."""
    curves = {}
    for name, columns in (("seen", lambda i: slice(0, i + 1)), ("unseen", lambda i: slice(i + 1, None))):
        rows: list[list] = [["step", "method", "accuracy"]]
        for i, step in enumerate(tasks):
            if columns(i).start < len(tasks):
                rows += [[f"{i + 1}. {step}", m, f"{a[i, columns(i)].mean():.2f}"] for m, a in matrices.items()]
        curves[name] = rows
    return curves


def accuracy_cells(tasks: list[str], matrices: dict[str, np.ndarray]) -> tuple[list[dict], list[dict]]:
    """The heatmaps' data: every method's accuracy per (step, task), and MoDER minus zero-shot per (step, task)."""
    label = [f"{i + 1}. {task}" for i, task in enumerate(tasks)]
    cells = [
        {"method": m, "step": label[i], "task": label[j], "accuracy": float(a[i, j])}
        for m, a in matrices.items()
        for i in range(len(tasks))
        for j in range(len(tasks))
    ]
    gain = matrices["moder"] - matrices["zeroshot"]
    deltas = [
        {"step": label[i], "task": label[j], "delta": round(float(gain[i, j]), 2)}
        for i in range(len(tasks))
        for j in range(len(tasks))
    ]
    return cells, deltas


def read_hub_cost(params: Params, hub: Path, experts: Path) -> HubCost:
    """The cost of the hub after the last step (<hub>/<last task>.parquet and the experts files it points at)."""
    last = list(params.tasks)[-1]
    try:
        return hub_cost(hub / f"{last}.parquet", experts)
    except (HubFileError, ExpertFileError) as error:
        raise type(error)(f"{error} [written by hub@{last} and the train stages: re-run them]") from None


def report(
    params: Params,
    evaluation: Path,
    finetune: Path,
    unseen: Path,
    hub: Path,
    experts: Path,
    metrics: Path,
    reports: Path,
) -> dict:
    """Writes metrics.json (the methods' figures and what the hub costs) and every file under `reports`
    together: all new, or (on any failure) all old."""
    matrices = read_matrices(params, evaluation, finetune)
    cost = read_hub_cost(params, hub, experts)
    figures: dict = {
        **metrics_of(params, matrices),
        "hub": {"classes": cost.classes, "parameters": cost.parameters, "megabytes": round(cost.bytes / 1e6, 2)},
    }
    tasks = list(params.tasks)
    plotted = {method: matrices[(method, "all")] for method in PLOTTED}
    cells, deltas = accuracy_cells(tasks, plotted)
    curves = step_curves(tasks, plotted)
    contents = {
        metrics: json.dumps(figures, indent=2) + "\n",
        reports / "accuracy.json": json.dumps(cells, indent=1) + "\n",
        reports / "delta.json": json.dumps(deltas, indent=1) + "\n",
        reports / "seen.csv": csv_text(curves["seen"]),
        reports / "unseen.csv": csv_text(curves["unseen"]),
        reports / "unseen_classes.csv": csv_text(unseen_class_rows(params, unseen)),
    }
    with atomic_files(list(contents)) as temporaries:
        for temporary, text in zip(temporaries, contents.values(), strict=True):
            temporary.write_text(text)
    print(f"wrote {metrics} and {reports}/; {cost_line(figures['hub'])}")
    print(f"the summary table: python -m stages.report --summary-only --reports {reports} --metrics {metrics}")
    return figures


LABELS = {
    "zeroshot": "zero-shot",
    "finetune": "finetune",
    "oracle": "oracle",
    "no_composition": "no comp.",
    "no_calibration": "no calib.",
    "moder": "MoDER",
}
ROWS = {
    "transfer": "Transfer",
    "transfer_new": "  new names",
    "transfer_recurring": "  recurring",
    "avg": "Avg",
    "last": "Last",
    "future": "Future",
}


def summary(params: Params, matrices: dict[str, np.ndarray], figures: dict) -> str:
    """Per task: accuracy before it is trained (mean over earlier steps) and after the last step; then each
    method's metrics, MoDER's gain, composition's and calibration's own effects, and the headroom taken."""
    tasks = list(params.tasks)
    zs, md = matrices["zeroshot"], matrices["moder"]
    out = [
        f"\nMoDER on {params.benchmark.name} ({params.benchmark.protocol}, {len(tasks)} tasks)",
        f"{'':<14}{'not yet trained':^27}{'after the last step':^27}",
        f"{'task':<14}" + f"{'zero-shot':>10}{'MoDER':>8}{'diff':>8}  " * 2,
    ]
    for j, task in enumerate(tasks):
        before = (
            ""
            if j == 0
            else f"{zs[:j, j].mean():>10.1f}{md[:j, j].mean():>8.1f}{md[:j, j].mean() - zs[:j, j].mean():>+8.1f}"
        )
        out.append(f"{task:<14}{before:<26}  {zs[-1, j]:>10.1f}{md[-1, j]:>8.1f}{md[-1, j] - zs[-1, j]:>+8.1f}")
    columns = ("zeroshot", "finetune", "oracle", "no_composition", "no_calibration", "moder")
    out.append(
        f"\n{'metric':<14}" + "".join(f"{LABELS[m]:>10}" for m in columns) + f"{'diff':>8}{'comp.':>8}{'calib.':>8}"
    )
    for key, label in ROWS.items():
        if key not in figures["moder"]:
            continue
        values = "".join(f"{figures[m][key]:>10.1f}" if key in figures[m] else f"{'-':>10}" for m in columns)
        gain = figures["moder"][key] - figures["zeroshot"][key] if key in figures["zeroshot"] else None
        parts = [gain, figures["composition"].get(key), figures["calibration"].get(key)]
        out.append(f"{label:<14}{values}" + "".join(f"{'':>8}" if v is None else f"{v:>+8.1f}" for v in parts))
    headroom = figures["headroom"]
    shares = [
        f"{what} {headroom[key]:.0%}"
        for key, what in (
            ("moder", "MoDER"),
            ("composition", "composition alone"),
            ("moder_new", "MoDER on new names"),
            ("composition_new", "composition alone on new names"),
        )
        if key in headroom
    ]
    out += [
        "(diff: MoDER - zero-shot; comp.: MoDER - MoDER without composition, whose untrained classes keep their",
        " zero-shot prototypes; calib.: MoDER - MoDER without calibration; oracle: MoDER with perfect retrieval,",
        " each untrained class using its own experts; new names: classes whose name no step so far has trained)",
        f"share of the oracle's Transfer headroom taken: {', '.join(shares) or 'none (no headroom)'}",
    ]
    return "\n".join(out)


def cost_line(hub: dict) -> str:
    """The hub's cost, as metrics.json records it."""
    return (
        f"hub after the last step: {hub['parameters']:,} trainable parameters "
        f"({hub['parameters'] // max(hub['classes'], 1):,} per class, {hub['classes']:,} classes), "
        f"{hub['megabytes']:,.1f} MB of experts files"
    )


def summary_text(params: Params, reports: Path, metrics: Path) -> str:
    """The summary of the last run, from its reports/accuracy.json (per task) and metrics.json (the figures
    and the hub's cost), with the settings that produced it (printed by `make run`, and a Prefect artifact
    of every flow run)."""
    path = reports / "accuracy.json"
    for needed in (path, metrics):
        if not needed.is_file():
            raise MissingInput(f"{needed} not found: run the pipeline first (dvc repro)")
    tasks = list(params.tasks)
    labels = [f"{i + 1}. {t}" for i, t in enumerate(tasks)]
    matrices = {method: np.full((len(tasks), len(tasks)), np.nan) for method in ("zeroshot", "moder")}
    cells, figures = (_json(needed) for needed in (path, metrics))
    for cell in cells:
        if cell["step"] in labels and cell["task"] in labels and cell["method"] in matrices:
            matrices[cell["method"]][labels.index(cell["step"]), labels.index(cell["task"])] = cell["accuracy"]
    if any(np.isnan(matrix).any() for matrix in matrices.values()):
        raise MissingInput(f"{path} does not cover the tasks in params.yaml ({', '.join(tasks)}): run dvc repro")
    if not isinstance(figures, dict) or not all(
        isinstance(figures.get(key), dict) for key in (*METHODS, "composition", "calibration", "headroom")
    ):
        raise MissingInput(f"{metrics} was written by an older version: run dvc repro")
    return "\n".join([summary(params, matrices, figures), f"\n{settings_line(params)}", cost_line(figures["hub"])])


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as error:
        raise MissingInput(f"{path}: not readable JSON ({error}): run dvc repro (the report stage writes it)") from None


def settings_line(params: Params) -> str:
    """What produced the figures, in one line."""
    expert, train, composition, retrieval = params.expert, params.train, params.composition, params.retrieval
    form = (
        f"LoRA rank {expert.lora.rank} on layers {expert.lora.layers or 'all'}"
        if expert.kind == "lora"
        else "context-token"
    )
    return (
        f"seed {params.seed}; {form} experts; negatives {train.negatives}, anchors {train.anchor_earlier}; "
        f"{composition.space}-space composition, alpha {composition.alpha}, alpha_unseen {composition.alpha_unseen}, "
        f"calibrate {composition.calibrate}; retrieval k={retrieval.k}, T={retrieval.temperature}, "
        f"null score {retrieval.null_score}, gate {retrieval.gate}"
    )


def cli() -> argparse.ArgumentParser:
    cli = parser(__doc__, ("reports", "the directory of plot data (accuracy.json, delta.json, seen.csv, ...)"))
    cli.add_argument("--evaluation", type=Path, help="the directory of evaluation rows (<step>.parquet)")
    cli.add_argument("--finetune", type=Path, help="the finetune baseline's evaluation rows (.parquet)")
    cli.add_argument(
        "--unseen", type=Path, help="the directory of per-class reports of unseen classes (<step>.parquet)"
    )
    cli.add_argument("--hub", type=Path, help="the directory of hub indexes (<step>.parquet)")
    cli.add_argument("--experts", type=Path, help="the directory of experts directories")
    cli.add_argument("--metrics", type=path_with_suffix(".json"), default=Path("metrics.json"))
    cli.add_argument(
        "--summary-only", action="store_true", help="print the last run's summary from its reports; write nothing"
    )
    return cli


def run(args: argparse.Namespace, params: Params) -> None:
    if args.summary_only:
        print(summary_text(params, args.reports, args.metrics))
    else:
        report(params, args.evaluation, args.finetune, args.unseen, args.hub, args.experts, args.metrics, args.reports)


def main() -> None:
    command = cli()
    args = command.parse_args()
    if not args.summary_only and None in (args.evaluation, args.finetune, args.unseen, args.hub, args.experts):
        command.error("--evaluation, --finetune, --unseen, --hub and --experts are required unless --summary-only")
    run_cli(run, args)


if __name__ == "__main__":
    main()
