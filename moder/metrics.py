"""Continual-learning metrics on an accuracy matrix (docs/design.md, "The metrics").

A[i][j] is the accuracy (percent) on task j's test set after training step i; the code
indexes from 0, the design from 1.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike
from torch import Tensor

from moder.params import Protocol


def _square(matrix: ArrayLike) -> np.ndarray:
    a = np.asarray(matrix, dtype=float)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 1:
        raise ValueError(f"accuracy matrix must be square T x T with T >= 1, got shape {a.shape}")
    if np.isnan(a).any():
        raise ValueError("accuracy matrix has missing (NaN) entries")
    return a


def transfer(matrix: ArrayLike) -> float:
    """Mean over j = 2..T of the mean over i < j of A[i][j]: zero-shot ability on tasks not yet trained."""
    a = _square(matrix)
    if a.shape[0] < 2:
        raise ValueError("transfer needs at least two tasks")
    return float(np.mean([a[:j, j].mean() for j in range(1, a.shape[0])]))


def average(matrix: ArrayLike) -> float:
    """Mean over j of the mean over i of A[i][j]."""
    return float(_square(matrix).mean(axis=0).mean())


def last(matrix: ArrayLike) -> float:
    """Mean over j of A[T][j]: every task after the final step."""
    return float(_square(matrix)[-1].mean())


def future(matrix: ArrayLike) -> float:
    """Mean over i = 1..T-1 of the mean over j > i of A[i][j] (mammoth's "AVG Transfer")."""
    a = _square(matrix)
    if a.shape[0] < 2:
        raise ValueError("future needs at least two tasks")
    return float(np.mean([a[i, i + 1 :].mean() for i in range(a.shape[0] - 1)]))


def transfer_over(matrix: ArrayLike) -> float | None:
    """Transfer over a subset of each task's test images (docs/design.md, "What a gain is made of"): A[i][j]
    is NaN where task j has no image of the subset after step i; those cells are left out, then the
    columns with no cell left. None when no cell is left; equal to `transfer` when none is NaN."""
    a = np.asarray(matrix, dtype=float)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"accuracy matrix must be square T x T, got shape {a.shape}")
    columns = [a[:j, j][~np.isnan(a[:j, j])] for j in range(1, a.shape[0])]
    means = [cells.mean() for cells in columns if len(cells)]
    return float(np.mean(means)) if means else None


def headroom_share(method: float, base: float, bound: float) -> float | None:
    """How much of the way from `base` to `bound` `method` goes: (method - base) / (bound - base); None where
    the bound is not above the base (no headroom to share)."""
    return (method - base) / (bound - base) if bound > base else None


def summarize(matrix: ArrayLike, protocol: Protocol) -> dict[str, float]:
    """The metrics.json entry of one method."""
    summary = {"transfer": transfer(matrix), "avg": average(matrix), "last": last(matrix)}
    if protocol == "classil":
        summary["future"] = future(matrix)
    elif protocol != "mtil":
        raise ValueError(f"unknown protocol {protocol!r}; allowed: mtil, classil")
    return summary


def label_space(protocol: Protocol, task_classes: list[list[str]], step: int, task: int) -> list[str]:
    """The classes that task `task`'s test set is classified among after training step `step`.

    MTIL: the task's own dataset classes. Class-IL (mammoth's future-task evaluation): a task
    already trained (task <= step) among the classes seen so far; a task not yet trained
    among all classes of the benchmark.
    """
    if not (0 <= step < len(task_classes) and 0 <= task < len(task_classes)):
        raise ValueError(f"step {step} or task {task} is outside 0..{len(task_classes) - 1}")
    if protocol == "mtil":
        return list(task_classes[task])
    if protocol == "classil":
        visible = task_classes[: step + 1] if task <= step else task_classes
        return [name for classes in visible for name in classes]
    raise ValueError(f"unknown protocol {protocol!r}; allowed: mtil, classil")


def cosine_scores(features: Tensor, prototypes: Tensor) -> Tensor:
    """[N, C] cosine similarity of every feature with every prototype."""
    return F.normalize(features.float(), dim=-1) @ F.normalize(prototypes.float(), dim=-1).T


def predict(features: Tensor, prototypes: Tensor, offsets: Tensor | None = None) -> Tensor:
    """The index of each feature's best prototype: cosine similarity, minus `offsets[c]` if given."""
    scores = cosine_scores(features, prototypes)
    return (scores if offsets is None else scores - offsets).argmax(dim=1)


def accuracy(features: Tensor, labels: Tensor, prototypes: Tensor, offsets: Tensor | None = None) -> float:
    """Percent of features whose best prototype is their own class's."""
    return 100.0 * (predict(features, prototypes, offsets) == labels).float().mean().item()


def class_accuracy(features: Tensor, labels: Tensor, prototypes: Tensor, offsets: Tensor | None = None) -> Tensor:
    """Percent right per class 0..len(prototypes)-1 (NaN for a class with no feature)."""
    right = (predict(features, prototypes, offsets) == labels).float()
    totals = torch.bincount(labels, minlength=len(prototypes)).float()
    return 100.0 * torch.bincount(labels, weights=right, minlength=len(prototypes)) / totals
