"""The accuracy of every task after one training step, for zero-shot, oracle and MoDER, in one line:
build every class's prototypes -> score each task in its label space -> explain the untrained classes.

Steps are 0-based positions in the task sequence throughout this module (`step` = the task just
trained); only the rows name them, by task name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moder.compose import compose_prototypes, smooth_toward_zeroshot
from moder.factory import ExpertFactory
from moder.hub import NULL_EXPERT, ExpertHub, Retrieval
from moder.metrics import Protocol, accuracy, class_accuracy, label_space
from moder.prompts import PromptSet
from moder.tasks import TaskData

ClassKey = tuple[str, str]  # (dataset, class name): the same name in two datasets is two classes


@dataclass(frozen=True)
class EvaluationSettings:
    """Built by moder.params.Params.evaluation_settings."""

    protocol: Protocol
    k: int
    temperature: float
    null_score: float | None
    space: str
    alpha: float
    calibrate: bool  # lower trained prototypes by their mean offset where untrained ones compete


@dataclass(frozen=True)
class TrainedTask:
    """What training left for one task that evaluation reads: each class's prototype under its own
    expert (encoded once, at training time) and its prototype offset (moder.train.prototype_offsets)."""

    prototypes: Tensor  # [n_classes, d]
    offsets: Tensor  # [n_classes]


@dataclass(frozen=True)
class AccuracyRow:
    step: str
    task: str
    method: str
    accuracy: float
    n_test: int


@dataclass(frozen=True)
class UnseenClassRow:
    """Why composition helped or hurt one class not yet trained: what it retrieved, and its accuracy."""

    step: str
    task: str
    class_name: str
    zeroshot: float  # percent of the class's test images right, in the task's label space
    moder: float
    retrieved: str  # "hub class [its task] weight; ..." in retrieval order; "null" is the frozen model


@dataclass(frozen=True)
class StepEvaluation:
    rows: list[AccuracyRow]
    unseen_classes: list[UnseenClassRow]


@dataclass(frozen=True)
class _Prototypes:
    """Every class's prototype per method after one step, and what each untrained class retrieved."""

    zeroshot: dict[ClassKey, Tensor]
    oracle: dict[ClassKey, Tensor]  # every class with its own task's experts, trained yet or not
    moder: dict[ClassKey, Tensor]  # own experts for trained classes, composed for the others
    retrieved: dict[ClassKey, str]
    offsets: dict[ClassKey, float]  # subtracted from trained classes' scores (calibration)


@torch.no_grad()
def evaluate_step(
    factory: ExpertFactory,
    sequence: list[TaskData],
    trained: list[TrainedTask],
    *,
    hub: ExpertHub,
    step: int,
    settings: EvaluationSettings,
) -> StepEvaluation:
    """Accuracy of every task after training sequence[step] (0-based), for three methods:

    - `zeroshot`: every class's zero-shot prototype;
    - `moder`: tasks 0..step use their own experts (seen classes); the classes of later tasks
      get prototypes composed from `hub` (the experts of tasks 0..step), retrieved by zero-shot prototype;
    - `oracle`: every class uses its own task's experts, trained or not yet (the upper bound
      composition could reach), which is why `trained` holds every task of the sequence.
    Each class of a later task also gets an `UnseenClassRow`.
    Trained prototypes are read from `trained`, never re-encoded: a step costs the composition of the
    classes not trained yet, so the whole sequence costs O(tasks), not O(tasks^2).
    """
    if len(trained) != len(sequence) or not 0 <= step < len(sequence):
        raise ValueError(f"step {step} with experts of {len(trained)} tasks for a sequence of {len(sequence)}")
    if sorted(set(hub.steps)) != [data.task.step for data in sequence[: step + 1]]:
        raise ValueError(f"the hub holds steps {sorted(set(hub.steps))}, not those of tasks 1..{step + 1}")
    prototypes = _build_prototypes(factory, sequence, trained, hub, step, settings)
    rows = [
        *accuracy_rows(sequence, step, settings.protocol, "zeroshot", prototypes.zeroshot),
        *accuracy_rows(sequence, step, settings.protocol, "oracle", prototypes.oracle),
        *accuracy_rows(sequence, step, settings.protocol, "moder", prototypes.moder, prototypes.offsets),
    ]
    return StepEvaluation(rows, _unseen_class_rows(sequence, step, settings.protocol, prototypes))


def _build_prototypes(
    factory: ExpertFactory,
    sequence: list[TaskData],
    trained: list[TrainedTask],
    hub: ExpertHub,
    step: int,
    settings: EvaluationSettings,
) -> _Prototypes:
    oracle: dict[ClassKey, Tensor] = {}
    for data, task in zip(sequence, trained, strict=True):
        if task.prototypes.shape != data.zeroshot.shape:
            raise ValueError(
                f"task {data.task.name}: trained prototypes {list(task.prototypes.shape)} "
                f"for zero-shot prototypes {list(data.zeroshot.shape)}"
            )
        own = smooth_toward_zeroshot(task.prototypes, data.zeroshot, settings.alpha)
        oracle.update(zip(_keys(data), own, strict=True))
    seen = [key for data in sequence[: step + 1] for key in _keys(data)]
    composed = {key: oracle[key] for key in seen}
    retrieved: dict[ClassKey, str] = {}
    for data in sequence[step + 1 :]:
        task_prompts = factory.prompts(data.class_names, list(data.templates))
        retrieval = hub.query(data.zeroshot, settings.k, settings.temperature, settings.null_score)
        retrieved.update(zip(_keys(data), _describe(retrieval, hub), strict=True))
        composed.update(zip(_keys(data), _compose(factory, task_prompts, hub, retrieval, settings.space), strict=True))
    offset = calibration_offset(hub) if settings.calibrate else 0.0
    zeroshot = {key: p for data in sequence for key, p in zip(_keys(data), data.zeroshot, strict=True)}
    return _Prototypes(zeroshot, oracle, composed, retrieved, dict.fromkeys(seen, offset))


def _keys(data: TaskData) -> list[ClassKey]:
    return [(data.task.dataset, name) for name in data.class_names]


def _compose(factory: ExpertFactory, prompts: PromptSet, hub: ExpertHub, retrieval: Retrieval, space: str) -> Tensor:
    return compose_prototypes(
        factory.tower, prompts, hub.experts, factory.null(), retrieval.indices, retrieval.weights, space
    )


def calibration_offset(hub: ExpertHub) -> float:
    """One offset for every trained prototype, the mean over the hub's classes (their offsets in
    float32, as training stored them): where only trained classes compete it changes nothing."""
    return torch.tensor(hub.offsets, dtype=torch.float32).mean().item()


def _describe(retrieval: Retrieval, hub: ExpertHub) -> list[str]:
    """Per query: "hub class [its task] weight; ..." in retrieval order ("null" for the frozen model)."""
    return [
        "; ".join(
            f"null {w:.3f}" if r == NULL_EXPERT else f"{hub.class_names[r]} [{hub.tasks[r]}] {w:.3f}"
            for r, w in zip(rows, weights, strict=True)
        )
        for rows, weights in zip(retrieval.indices.tolist(), retrieval.weights.tolist(), strict=True)
    ]


def _unseen_class_rows(
    sequence: list[TaskData], step: int, protocol: Protocol, prototypes: _Prototypes
) -> list[UnseenClassRow]:
    """Every class not yet trained: its zero-shot and composed accuracy, and what it retrieved."""
    rows = []
    for index in range(step + 1, len(sequence)):
        data = sequence[index]
        keys, labels = _label_space(sequence, step, protocol, index)
        per_class = {
            method: class_accuracy(
                data.test_features, labels, torch.stack([table[key] for key in keys]), _shift(keys, offsets)
            )
            for method, table, offsets in (
                ("zeroshot", prototypes.zeroshot, None),
                ("moder", prototypes.moder, prototypes.offsets),
            )
        }
        position = {key: i for i, key in enumerate(keys)}
        rows += [
            UnseenClassRow(
                sequence[step].task.name,
                data.task.name,
                key[1],
                float(per_class["zeroshot"][position[key]]),
                float(per_class["moder"][position[key]]),
                prototypes.retrieved[key],
            )
            for key in _keys(data)
        ]
    return rows


def _label_space(sequence: list[TaskData], step: int, protocol: Protocol, index: int) -> tuple[list[ClassKey], Tensor]:
    """The classes task `index` is classified among after `step`, and its test labels in that space."""
    data = sequence[index]
    space = label_space(protocol, [d.class_names for d in sequence], step, index)
    position = {name: i for i, name in enumerate(space)}
    labels = torch.tensor([position[data.class_names[int(y)]] for y in data.test_labels])
    return [(data.task.dataset, name) for name in space], labels


def _shift(keys: list[ClassKey], offsets: dict[ClassKey, float] | None) -> Tensor | None:
    return None if offsets is None else torch.tensor([offsets.get(key, 0.0) for key in keys])


def accuracy_rows(
    sequence: list[TaskData],
    step: int,
    protocol: Protocol,
    method: str,
    prototypes: dict[ClassKey, Tensor],
    offsets: dict[ClassKey, float] | None = None,
) -> list[AccuracyRow]:
    """Every task's accuracy after `step` (0-based) with one prototype per (dataset, class), in the
    protocol's label spaces; `offsets` are subtracted from their classes' scores."""
    rows = []
    for index, data in enumerate(sequence):
        keys, labels = _label_space(sequence, step, protocol, index)
        score = accuracy(
            data.test_features, labels, torch.stack([prototypes[key] for key in keys]), _shift(keys, offsets)
        )
        rows.append(AccuracyRow(sequence[step].task.name, data.task.name, method, score, len(labels)))
    return rows
