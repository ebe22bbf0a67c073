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
    experts: list[Experts],
    settings: EvaluationSettings,
) -> StepEvaluation:
    """Accuracy of every task after step t = len(experts), for `zeroshot` and `moder`.

    Tasks 1..t use their own experts (seen classes); the classes of later tasks get
    prototypes composed from the hub of experts 1..t, retrieved by zero-shot prototype.
    Each class of a later task also gets an `UnseenClassRow`.
    """
    step = len(experts)
    if not 1 <= step <= len(sequence):
        raise ValueError(f"{step} steps of experts for a sequence of {len(sequence)} tasks")
    tower = factory.tower
    hub = ExpertHub(backbone)
    moder: dict[tuple[str, str], Tensor] = {}
    for data, task_experts in zip(sequence[:step], experts):
        hub.append(data.task.step, data.class_names, data.zeroshot, task_experts)
        prototypes = seen_prototypes(
            tower, factory.prompts(data.class_names, list(data.templates)), task_experts, data.zeroshot, settings.alpha
        )
        moder.update({(data.task.dataset, name): p for name, p in zip(data.class_names, prototypes)})
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

    task_classes = [data.class_names for data in sequence]
    step_name = sequence[step - 1].task.name
    rows, unseen = [], []
    for index, data in enumerate(sequence):
        space = label_space(settings.protocol, task_classes, step - 1, index)
        position = {name: i for i, name in enumerate(space)}
        labels = torch.tensor([position[data.class_names[int(y)]] for y in data.test_labels])
        per_class = {}
        for method, table in (("zeroshot", zeroshot), ("moder", moder)):
            prototypes = torch.stack([table[(data.task.dataset, name)] for name in space])
            rows.append(AccuracyRow(step_name, data.task.name, method,
                                    accuracy(data.test_features, labels, prototypes), len(labels)))
            if index >= step:  # classes not yet trained get the per-class report
                per_class[method] = class_accuracy(data.test_features, labels, prototypes)
        if index >= step:
            unseen += [UnseenClassRow(step_name, data.task.name, name, float(per_class["zeroshot"][position[name]]),
                                      float(per_class["moder"][position[name]]), retrieved[(data.task.dataset, name)])
                       for name in data.class_names]
    return StepEvaluation(rows, unseen)
