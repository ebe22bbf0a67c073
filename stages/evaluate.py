"""Stage `evaluate@<step>`: accuracy of every task after training step <step>, for zero-shot, oracle and MoDER."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from moder.evaluation import StepEvaluation, evaluate_step
from moder.factory import ExpertFactory
from moder.hub import ExpertHub, HubFileError
from moder.params import Params
from moder.results import AccuracyRow, UnseenClassRow
from moder.tasks import TaskData
from moder.text import TextTower
from moder.train import TrainedTask
from stages.common import check_task, parser, run_cli
from stages.files import expert_file, load_frozen_clip, load_sequence, made_by, read_task_experts, write_rows

USES_DEVICE = True


@dataclass(frozen=True)
class StepInputs:
    """What the evaluation of one step reads, loaded and checked."""

    factory: ExpertFactory
    sequence: list[TaskData]
    trained: list[TrainedTask]  # every task's, later steps' too (the oracle reads them)
    hub: ExpertHub  # the experts of the tasks trained up to this step
    step: int  # 0-based position of the step in the sequence


def load_step_inputs(params: Params, step: str, model: Path, features: Path, experts: Path, hub: Path) -> StepInputs:
    """Reads every task's test features and experts (<experts>/<dataset>/split-<i>.safetensors) and the hub of
    this step (the hub stage's index). scripts/headroom.py reads a step through this too."""
    check_task(params, step)
    clip = load_frozen_clip(params, model)
    identity = clip.identity.to_json()
    sequence = load_sequence(params, features, identity)
    trained = []
    for data in sequence:
        path = expert_file(experts / data.task.dataset, params.tasks[data.task.name].split)
        with made_by(f"train@{data.task.dataset}"):
            trained.append(read_task_experts(path, data.class_names, data.task.name, identity)[1])
    try:
        step_hub = ExpertHub.load_index(hub, experts, identity)
    except HubFileError as error:
        raise HubFileError(f"{error} [written by hub@{step}: re-run it]") from None
    factory = ExpertFactory(TextTower(clip.model, clip.tokenizer), params.expert, params.templates)
    return StepInputs(factory, sequence, trained, step_hub, list(params.tasks).index(step))


def evaluate(
    params: Params, step: str, model: Path, features: Path, experts: Path, hub: Path, out: Path, unseen_out: Path
) -> StepEvaluation:
    """Writes the accuracy rows of every method after `step` to `out` and the per-class report of classes not
    yet trained to `unseen_out`."""
    inputs = load_step_inputs(params, step, model, features, experts, hub)
    evaluation = evaluate_step(
        inputs.factory,
        inputs.sequence,
        inputs.trained,
        hub=inputs.hub,
        step=inputs.step,
        settings=params.evaluation_settings(),
    )
    write_rows(out, evaluation.rows, AccuracyRow)
    write_rows(unseen_out, evaluation.unseen_classes, UnseenClassRow)
    return evaluation


def cli() -> argparse.ArgumentParser:
    cli = parser(
        __doc__,
        ("model", "the pre-trained CLIP checkpoint"),
        ("features", "the directory of feature directories"),
        ("experts", "the directory of experts files"),
        ("hub", "the hub index of this step (hub@<step>)", ".parquet"),
        ("out", "the accuracy rows to write", ".parquet"),
        ("unseen-out", "the per-class report of classes not yet trained", ".parquet"),
    )
    cli.add_argument("--step", required=True, help="the task after whose training to evaluate")
    return cli


def run(args: argparse.Namespace, params: Params) -> None:
    evaluate(params, args.step, args.model, args.features, args.experts, args.hub, args.out, args.unseen_out)


def main() -> None:
    run_cli(run, cli().parse_args())


if __name__ == "__main__":
    main()
