"""Stage `report`: the accuracy matrices as metrics.json (Transfer/Avg/Last per method), plot data and a summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from moder.evaluation import AccuracyRow
from moder.experts import ExpertFileError
from moder.hub import HubCost, HubFileError, hub_cost
from moder.io import atomic_files, csv_text
from moder.metrics import summarize
from moder.params import Params
from stages.common import MissingInput, parser, path_with_suffix, run_cli

METHODS = ("zeroshot", "finetune", "oracle", "moder")


def read_matrices(params: Params, evaluation: Path, finetune: Path) -> dict[str, np.ndarray]:
    """A[i][j] per method: accuracy on task j after step i, from each step's evaluation rows and the
    finetune baseline's rows."""
    tasks = list(params.tasks)
    matrices = {method: np.full((len(tasks), len(tasks)), np.nan) for method in METHODS}
    sources = [(evaluation / f"{step}.parquet", f"evaluate@{step}") for step in tasks] + [(finetune, "finetune")]
    for path, stage in sources:
        if not path.is_file():
            raise MissingInput(f"evaluation rows not found: {path} (run {stage})")
        for row in (AccuracyRow(**r) for r in pq.read_table(path).to_pylist()):
            if row.method in matrices and row.task in tasks and row.step in tasks:
                matrices[row.method][tasks.index(row.step), tasks.index(row.task)] = row.accuracy
    for method, matrix in matrices.items():
        missing = [f"{tasks[i]}/{tasks[j]}" for i, j in zip(*np.nonzero(np.isnan(matrix)), strict=True)]
        if missing:
            raise MissingInput(
                f"no {method} accuracy for step/task {', '.join(missing[:5])} in {evaluation}; "
                "re-run the evaluate and finetune stages (dvc repro)"
            )
    return matrices


# metrics.json's order, which is `dvc exp show`'s column order: what the method gives and what it must beat first
METRICS_ORDER = ("moder", "zeroshot", "oracle", "finetune")


def metrics_of(params: Params, matrices: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    return {
        m: {k: round(v, 2) for k, v in summarize(matrices[m], params.benchmark.protocol).items()} for m in METRICS_ORDER
    }


def unseen_class_rows(params: Params, unseen: Path) -> list[list]:
    """Every class not yet trained after each step: zero-shot vs composed accuracy, the similarity of its
    closest hub class (what the gate reads) and what was retrieved."""
    rows: list[list] = [["step", "task", "class", "zeroshot", "moder", "diff", "similarity", "retrieved"]]
    for step in params.tasks:
        path = unseen / f"{step}.parquet"
        if not path.is_file():
            raise MissingInput(f"per-class report not found: {path} (run evaluate@{step})")
        for row in pq.read_table(path).to_pylist():
            rows.append(
                [
                    row["step"],
                    row["task"],
                    row["class_name"],
                    f"{row['zeroshot']:.2f}",
                    f"{row['moder']:.2f}",
                    f"{row['moder'] - row['zeroshot']:+.2f}",
                    f"{row['similarity']:.4f}",
                    row["retrieved"],
                ]
            )
    return rows


def step_curves(tasks: list[str], matrices: dict[str, np.ndarray]) -> dict[str, list[list]]:
    """Mean accuracy after each step over the tasks already trained ("seen") and those not yet ("unseen"),
    one row per step and method (the plots colour by method)."""
    curves = {}
    for name, columns in (("seen", lambda i: slice(0, i + 1)), ("unseen", lambda i: slice(i + 1, None))):
        rows: list[list] = [["step", "method", "accuracy"]]
        for i, step in enumerate(tasks):
            if columns(i).start < len(tasks):
                rows += [[f"{i + 1}. {step}", m, f"{matrices[m][i, columns(i)].mean():.2f}"] for m in METHODS]
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
    cells, deltas = accuracy_cells(tasks, matrices)
    curves = step_curves(tasks, matrices)
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


def summary(params: Params, matrices: dict[str, np.ndarray], figures: dict[str, dict[str, float]]) -> str:
    """Per task: accuracy before it is trained (mean over earlier steps) and after the last step; then the metrics."""
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
    out.append(f"\n{'metric':<14}{'zero-shot':>10}{'finetune':>10}{'oracle':>8}{'MoDER':>8}{'diff':>8}")
    for name in figures["zeroshot"]:
        z, f, o, m = (figures[method][name] for method in METHODS)
        out.append(f"{name.capitalize():<14}{z:>10.1f}{f:>10.1f}{o:>8.1f}{m:>8.1f}{m - z:>+8.1f}")
    out.append(
        "(diff: MoDER - zero-shot; oracle: MoDER with perfect retrieval, each untrained class using its own experts)"
    )
    return "\n".join(out)


def cost_line(hub: dict) -> str:
    """The hub's cost, as metrics.json records it."""
    return (
        f"hub after the last step: {hub['parameters']:,} trainable parameters "
        f"({hub['parameters'] // max(hub['classes'], 1):,} per class, {hub['classes']:,} classes), "
        f"{hub['megabytes']:,.1f} MB of experts files"
    )


def summary_text(params: Params, reports: Path, metrics: Path) -> str:
    """The summary of the last run from its reports/accuracy.json, with the settings that produced it and
    the hub's cost from metrics.json (printed by `make run`, and a Prefect artifact of every flow run)."""
    path = reports / "accuracy.json"
    if not path.is_file():
        raise MissingInput(f"{path} not found: run the pipeline first (dvc repro)")
    tasks = list(params.tasks)
    labels = [f"{i + 1}. {t}" for i, t in enumerate(tasks)]
    matrices = {method: np.full((len(tasks), len(tasks)), np.nan) for method in METHODS}
    for cell in json.loads(path.read_text()):
        if cell["step"] in labels and cell["task"] in labels and cell["method"] in matrices:
            matrices[cell["method"]][labels.index(cell["step"]), labels.index(cell["task"])] = cell["accuracy"]
    if any(np.isnan(matrix).any() for matrix in matrices.values()):
        raise MissingInput(f"{path} does not cover the tasks in params.yaml ({', '.join(tasks)}): run dvc repro")
    hub = json.loads(metrics.read_text()).get("hub") if metrics.is_file() else None
    return "\n".join(
        [
            summary(params, matrices, metrics_of(params, matrices)),
            f"\n{settings_line(params)}",
            cost_line(hub) if isinstance(hub, dict) else f"hub cost: not in {metrics} (run dvc repro)",
        ]
    )


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


def main() -> None:
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
    args = cli.parse_args()
    if not args.summary_only and None in (args.evaluation, args.finetune, args.unseen, args.hub, args.experts):
        cli.error("--evaluation, --finetune, --unseen, --hub and --experts are required unless --summary-only")
    run_cli(
        lambda args, params: (
            print(summary_text(params, args.reports, args.metrics))
            if args.summary_only
            else report(
                params,
                args.evaluation,
                args.finetune,
                args.unseen,
                args.hub,
                args.experts,
                args.metrics,
                args.reports,
            )
        ),
        args,
    )


if __name__ == "__main__":
    main()
