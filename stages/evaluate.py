"""Stage `evaluate@<step>`: accuracy of every task after training step <step>, for zero-shot, oracle and MoDER."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from moder.evaluation import AccuracyRow, StepEvaluation, TrainedTask, UnseenClassRow, evaluate_step
from moder.experts import ExpertFileError, load_experts
from moder.factory import ExpertFactory
from moder.params import Params
from moder.tasks import TaskData
from moder.text import TextTower
from stages.common import check_task, expert_file, load_frozen_clip, load_sequence, made_by, parser, run_cli, write_rows


def evaluate(
    params: Params, step: str, model: Path, features: Path, experts: Path, out: Path, unseen_out: Path
) -> StepEvaluation:
    """Reads every task's test features and experts (<experts>/<dataset>/split-<i>.safetensors; the
    oracle uses those of later steps too).

    Writes the accuracy rows to `out` and the per-class report of classes not yet trained to `unseen_out`.
    """
    check_task(params, step)
    clip = load_frozen_clip(params, model)
    identity = clip.identity.to_json()
    sequence = load_sequence(params, features, identity)
    trained = []
    for data in sequence:
        with made_by(f"train@{data.task.dataset}"):
            trained.append(
                read_trained(
                    expert_file(experts / data.task.dataset, params.tasks[data.task.name].split), data, identity
                )
            )
    factory = ExpertFactory(TextTower(clip.model, clip.tokenizer), params.expert.spec(), params.templates)
    evaluation = evaluate_step(
        factory, identity, sequence, trained, step=list(params.tasks).index(step), settings=params.evaluation_settings()
    )
    write_rows(out, evaluation.rows, AccuracyRow)
    write_rows(unseen_out, evaluation.unseen_classes, UnseenClassRow)
    return evaluation


def read_trained(path: Path, data: TaskData, identity: str) -> TrainedTask:
    """A task's experts and prototype offsets, checked against the task's classes."""
    experts, names, extra = load_experts(path, identity)
    if names != data.class_names:
        raise ExpertFileError(f"{path} holds experts for other classes than task {data.task.name}")
    offsets = extra.get("offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != len(names)
        or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in offsets)
    ):
        raise ExpertFileError(f"{path}: its prototype offsets are not {len(names)} finite numbers")
    return TrainedTask(experts, torch.tensor(offsets, dtype=torch.float32))


def main() -> None:
    cli = parser(
        __doc__,
        ("model", "the pre-trained CLIP checkpoint"),
        ("features", "the directory of feature directories"),
        ("experts", "the directory of experts files"),
        ("out", "the accuracy rows to write", ".parquet"),
        ("unseen-out", "the per-class report of classes not yet trained", ".parquet"),
    )
    cli.add_argument("--step", required=True, help="the task after whose training to evaluate")
    run_cli(
        lambda args, params: evaluate(
            params, args.step, args.model, args.features, args.experts, args.out, args.unseen_out
        ),
        cli.parse_args(),
    )


if __name__ == "__main__":
    main()
