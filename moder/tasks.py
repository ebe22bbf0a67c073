"""A benchmark's task sequence: which classes of which dataset each training step brings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from moder.world import class_splits

if TYPE_CHECKING:  # params builds evaluation settings, whose module reads TaskData from here
    from moder.params import Params


@dataclass(frozen=True)
class Task:
    name: str
    step: int  # 1-based position in the sequence (a dataset's split number for `dataset_tasks`)
    dataset: str
    classes: list[int]  # indices into the dataset's class list


@dataclass(frozen=True)
class TaskData:
    """What evaluation needs of one task: its classes and its test features."""

    task: Task
    class_names: list[str]  # the task's classes, in Task.classes order
    zeroshot: Tensor  # [n_classes, d] zero-shot prototypes of those classes
    test_features: Tensor  # [N, d]
    test_labels: Tensor  # [N] positions in class_names
    templates: tuple[str, ...] = ()  # the dataset's prompt templates (empty: the factory's)


def _task(params: Params, name: str, step: int, dataset: str, split: int, n_classes: int) -> Task:
    """Part `split` of the dataset's classes (shuffled from the seed, or in label order)."""
    spec = params.datasets[dataset]
    parts = class_splits(n_classes, spec.splits, params.seed, dataset, spec.class_order == "shuffled")
    return Task(name, step, dataset, parts[split - 1].tolist())


def benchmark_tasks(params: Params, n_classes: dict[str, int]) -> list[Task]:
    """The benchmark's tasks in sequence order, of the datasets `n_classes` names (with their number
    of classes); steps keep their place in the whole sequence."""
    return [
        _task(params, name, step, task.dataset, task.split, n_classes[task.dataset])
        for step, (name, task) in enumerate(params.tasks.items(), start=1)
        if task.dataset in n_classes
    ]


def dataset_tasks(params: Params, dataset: str, n_classes: int) -> list[Task]:
    """A dataset's splits 1..splits as tasks named "<dataset> split <i>", in training order."""
    return [
        _task(params, f"{dataset} split {split}", split, dataset, split, n_classes)
        for split in range(1, params.datasets[dataset].splits + 1)
    ]
