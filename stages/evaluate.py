"""Stage `evaluate@<step>`: accuracy of every task after training step <step>, for zero-shot and MoDER."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from moder.benchmark import AccuracyRow, EvaluationSettings, StepEvaluation, TaskData, UnseenClassRow, evaluate_step
from moder.experts import ExpertFileError, load_experts
from moder.factory import ExpertFactory
from moder.features import read_features
from moder.io import atomic_path
from moder.params import Params
from moder.text import TextTower
from stages.common import check_task, load_backbone, parser, run_cli, tasks_of


def evaluate(params: Params, step: str, pretrained: Path, features: Path, experts: Path, out: Path,
             unseen_out: Path) -> StepEvaluation:
    """Reads every task's test features and the experts <experts>/<task>.safetensors of steps 1..step.

    Writes the accuracy rows to `out` and the per-class report of classes not yet trained to `unseen_out`.
    """
    check_task(params, step)
    clip = load_backbone(params, pretrained)
    identity = clip.identity.to_json()
    datasets = dict.fromkeys(task.dataset for task in params.tasks.values())
    classes = {d: read_features(features / d / "classes.parquet", identity) for d in datasets}
    tests = {d: read_features(features / d / "test.parquet", identity) for d in datasets}
    sequence = []
    for task in tasks_of(params, {d: len(table.class_names) for d, table in classes.items()}):
        table = classes[task.dataset]
        features, labels = tests[task.dataset].select(task.classes)
        sequence.append(TaskData(task, [table.class_names[i] for i in task.classes], table.vectors[task.classes],
                                 features, labels, table.templates))
    trained = []
    for data in sequence[: list(params.tasks).index(step) + 1]:
        path = experts / f"{data.task.name}.safetensors"
        task_experts, names, _ = load_experts(path, identity)
        if names != data.class_names:
            raise ExpertFileError(f"{path} holds experts for other classes than task {data.task.name}; re-run train@{data.task.name}")
        trained.append(task_experts)

    factory = ExpertFactory(TextTower(clip.model, clip.tokenizer), params.expert.spec(), params.templates)
    settings = EvaluationSettings(params.benchmark.protocol, params.retrieval.k, params.retrieval.temperature,
                                  params.retrieval.null_score, params.composition.space, params.composition.alpha)
    evaluation = evaluate_step(factory, identity, sequence, trained, settings)
    write_rows(out, evaluation.rows, AccuracyRow)
    write_rows(unseen_out, evaluation.unseen_classes, UnseenClassRow)
    return evaluation


def write_rows(path: Path, rows: list, row_type: type) -> None:
    """Dataclass rows as Parquet (the schema comes from the row type, so an empty table is still typed)."""
    names = [field.name for field in fields(row_type)]
    kinds = {"str": pa.string(), "float": pa.float64(), "int": pa.int64()}
    schema = pa.schema([(field.name, kinds[field.type]) for field in fields(row_type)])
    table = pa.Table.from_pylist([{n: getattr(row, n) for n in names} for row in rows], schema=schema)
    with atomic_path(path) as temporary:
        pq.write_table(table, temporary)


def main() -> None:
    cli = parser(__doc__, ("model", "the pre-trained CLIP checkpoint"), ("features", "the directory of feature directories"),
                 ("experts", "the directory of experts files"), ("out", "the accuracy rows to write (.parquet)"),
                 ("unseen-out", "the per-class report of classes not yet trained (.parquet)"))
    cli.add_argument("--step", required=True, help="the task after whose training to evaluate")
    run_cli(lambda args, params: evaluate(params, args.step, args.model, args.features, args.experts, args.out,
                                          args.unseen_out), cli.parse_args())


if __name__ == "__main__":
    main()
