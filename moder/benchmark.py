"""A benchmark's task sequence, and the accuracy of every task after one training step."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moder.compose import compose_prototypes, seen_prototypes
from moder.experts import Experts
from moder.factory import ExpertFactory
from moder.hub import NULL_EXPERT, ExpertHub
from moder.metrics import Protocol, accuracy, class_accuracy, label_space
from moder.world import class_splits


@dataclass(frozen=True)
class Task:
    name: str
    step: int  # 1-based position in the sequence
    dataset: str
    classes: list[int]  # indices into the dataset's class list


def make_task(name: str, step: int, dataset: str, split: int, splits: int, n_classes: int, seed: int,
              shuffle: bool = True) -> Task:
    """Task `name` gets part `split` of its dataset's classes (shuffled from `seed`, or in label order)
    cut into `splits` parts."""
    return Task(name, step, dataset, class_splits(n_classes, splits, seed, dataset, shuffle)[split - 1].tolist())


@dataclass(frozen=True)
class TaskData:
    """What evaluation needs of one task: its classes and its test features."""

    task: Task
    class_names: list[str]  # the task's classes, in Task.classes order
    zeroshot: Tensor  # [n_classes, d] zero-shot prototypes of those classes
    test_features: Tensor  # [N, d]
    test_labels: Tensor  # [N] positions in class_names
    templates: tuple[str, ...] = ()  # the dataset's prompt templates (empty: the factory's)


@dataclass(frozen=True)
class EvaluationSettings:
    protocol: Protocol
    k: int
    temperature: float
    null_score: float | None
    space: str
    alpha: float
    calibrate: bool = False  # lower trained prototypes by their mean offset where untrained ones compete


@dataclass(frozen=True)
class TrainedTask:
    """What training left for one task: its experts, and each class's prototype offset
    (moder.train.prototype_offsets)."""

    experts: Experts
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


@torch.no_grad()
def evaluate_step(
    factory: ExpertFactory,
    backbone: str,
    sequence: list[TaskData],
    trained: list[TrainedTask],
    step: int,
    settings: EvaluationSettings,
) -> StepEvaluation:
    """Accuracy of every task after training step `step` (1-based), for three methods:

    - `zeroshot`: every class's zero-shot prototype;
    - `moder`: tasks 1..step use their own experts (seen classes); the classes of later tasks
      get prototypes composed from the hub of experts 1..step, retrieved by zero-shot prototype;
    - `oracle`: every class uses its own task's experts, trained or not yet (the upper bound
      composition could reach), which is why `trained` holds every task of the sequence.
    Each class of a later task also gets an `UnseenClassRow`.
    """
    if len(trained) != len(sequence) or not 1 <= step <= len(sequence):
        raise ValueError(f"step {step} with experts of {len(trained)} tasks for a sequence of {len(sequence)}")
    tower = factory.tower
    hub = ExpertHub(backbone)
    own: dict[tuple[str, str], Tensor] = {}
    for data, task in zip(sequence, trained):
        prompts = factory.prompts(data.class_names, list(data.templates))
        prototypes = seen_prototypes(tower, prompts, task.experts, data.zeroshot, settings.alpha)
        own.update({(data.task.dataset, name): p for name, p in zip(data.class_names, prototypes)})
        if data.task.step <= step:
            hub.append(data.task.step, data.class_names, data.zeroshot, task.experts)
    seen = {(d.task.dataset, n) for d in sequence[:step] for n in d.class_names}
    moder = {key: p for key, p in own.items() if key in seen}
    retrieved: dict[tuple[str, str], str] = {}
    for data in sequence[step:]:
        retrieval = hub.query(data.zeroshot, settings.k, settings.temperature, settings.null_score)
        for name, rows_, weights in zip(data.class_names, retrieval.indices.tolist(), retrieval.weights.tolist()):
            retrieved[(data.task.dataset, name)] = "; ".join(
                f"null {w:.3f}" if r == NULL_EXPERT else f"{hub.class_names[r]} [{sequence[hub.steps[r] - 1].task.name}] {w:.3f}"
                for r, w in zip(rows_, weights)
            )
        prototypes = compose_prototypes(
            tower, factory.prompts(data.class_names, list(data.templates)), hub.experts, factory.null(),
            retrieval.indices, retrieval.weights, settings.space,
        )
        moder.update({(data.task.dataset, name): p for name, p in zip(data.class_names, prototypes)})
    zeroshot = {(d.task.dataset, n): p for d in sequence for n, p in zip(d.class_names, d.zeroshot)}
    # One offset for every trained prototype: where only trained classes compete it changes nothing.
    offset = torch.cat([t.offsets for t in trained[:step]]).mean().item() if settings.calibrate else 0.0

    seen_offsets = {key: offset for key in seen}
    rows = (accuracy_rows(sequence, step, settings.protocol, "zeroshot", zeroshot)
            + accuracy_rows(sequence, step, settings.protocol, "oracle", own)
            + accuracy_rows(sequence, step, settings.protocol, "moder", moder, seen_offsets))
    unseen = []
    for index in range(step, len(sequence)):  # classes not yet trained: the per-class report
        data = sequence[index]
        keys, labels = _label_space(sequence, step, settings.protocol, index)
        per_class = {method: class_accuracy(data.test_features, labels, torch.stack([table[key] for key in keys]),
                                            _shift(keys, shifts))
                     for method, table, shifts in (("zeroshot", zeroshot, None), ("moder", moder, seen_offsets))}
        position = {key: i for i, key in enumerate(keys)}
        unseen += [UnseenClassRow(sequence[step - 1].task.name, data.task.name, name,
                                  float(per_class["zeroshot"][position[(data.task.dataset, name)]]),
                                  float(per_class["moder"][position[(data.task.dataset, name)]]),
                                  retrieved[(data.task.dataset, name)])
                   for name in data.class_names]
    return StepEvaluation(rows, unseen)


def _label_space(sequence: list[TaskData], step: int, protocol: Protocol, index: int) -> tuple[list[tuple[str, str]], Tensor]:
    """The (dataset, class) keys task `index` is classified among after `step`, and its test labels in that space."""
    data = sequence[index]
    space = label_space(protocol, [d.class_names for d in sequence], step - 1, index)
    position = {name: i for i, name in enumerate(space)}
    labels = torch.tensor([position[data.class_names[int(y)]] for y in data.test_labels])
    return [(data.task.dataset, name) for name in space], labels


def _shift(keys: list[tuple[str, str]], offsets: dict[tuple[str, str], float] | None) -> Tensor | None:
    return None if offsets is None else torch.tensor([offsets.get(key, 0.0) for key in keys])


def accuracy_rows(sequence: list[TaskData], step: int, protocol: Protocol, method: str,
                  prototypes: dict[tuple[str, str], Tensor],
                  offsets: dict[tuple[str, str], float] | None = None) -> list[AccuracyRow]:
    """Every task's accuracy after `step` (1-based) with one prototype per (dataset, class), in the
    protocol's label spaces; `offsets` are subtracted from their classes' scores."""
    rows = []
    for index, data in enumerate(sequence):
        keys, labels = _label_space(sequence, step, protocol, index)
        accuracy_ = accuracy(data.test_features, labels, torch.stack([prototypes[key] for key in keys]),
                             _shift(keys, offsets))
        rows.append(AccuracyRow(sequence[step - 1].task.name, data.task.name, method, accuracy_, len(labels)))
    return rows
