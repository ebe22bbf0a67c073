"""From accuracy rows to the figures metrics.json holds (docs/design.md, "The metrics" and "What a gain is
made of"): per method Transfer (over all images, new names, recurring names), Avg, Last (and Future), then
what separates the causes of a gain: composition's own effect, calibration's, and the share of the oracle's
headroom taken."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from moder.metrics import headroom_share, summarize, transfer_over
from moder.params import Protocol

# Which of a task's test images a row scores (docs/design.md, "What a gain is made of"): all of them, or, for a
# task not yet trained, those of classes whose name no step so far has trained in any dataset (new: only
# composition can help them) and those whose name some earlier step trained (recurring: retrieval finds it).
Names = Literal["all", "new", "recurring"]


@dataclass(frozen=True)
class AccuracyRow:
    step: str
    task: str
    method: str
    accuracy: float
    n_test: int
    names: str = "all"  # Names


@dataclass(frozen=True)
class UnseenClassRow:
    """Why composition helped or hurt one class not yet trained: what it retrieved, and its accuracy."""

    step: str
    task: str
    class_name: str
    names: str  # new, or recurring (its name trained by an earlier step, in any dataset)
    zeroshot: float  # percent of the class's test images right, in the task's label space
    moder: float
    similarity: float  # cosine of its zero-shot prototype to the closest hub class's key
    retrieved: str  # "hub class [its task] weight; ..." in retrieval order; "null" is the frozen model


# metrics.json's order, which is `dvc exp show`'s column order: what the method gives, what isolates its
# parts, then what it must beat
METHODS = ("moder", "no_composition", "no_calibration", "zeroshot", "oracle", "finetune")
SUBSETS = ("new", "recurring")  # Transfer over these names: transfer_new, transfer_recurring


def accuracy_matrices(rows: Iterable[AccuracyRow], tasks: list[str]) -> dict[tuple[str, str], np.ndarray]:
    """A[i][j] per (method, names): accuracy on task j after step i; NaN where no row gives it."""
    matrices: dict[tuple[str, str], np.ndarray] = {}
    for row in rows:
        if row.task in tasks and row.step in tasks:
            matrix = matrices.setdefault((row.method, row.names), np.full((len(tasks), len(tasks)), np.nan))
            matrix[tasks.index(row.step), tasks.index(row.task)] = row.accuracy
    return matrices


def method_figures(matrices: dict[tuple[str, str], np.ndarray], method: str, protocol: Protocol) -> dict[str, float]:
    """One method's metrics.json entry (rounded to 0.01): its metrics over all images, then Transfer over
    new and over recurring names where the sequence has any."""
    figures = summarize(matrices[(method, "all")], protocol)
    for names in SUBSETS:
        value = transfer_over(matrices[(method, names)]) if (method, names) in matrices else None
        if value is not None:
            figures[f"transfer_{names}"] = value
    return {key: round(value, 2) for key, value in figures.items()}


def _differences(a: dict[str, float], b: dict[str, float], keys: tuple[str, ...]) -> dict[str, float]:
    return {key: round(a[key] - b[key], 2) for key in keys if key in a and key in b}


TRANSFERS = ("transfer", *(f"transfer_{names}" for names in SUBSETS))


def effects(figures: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """What separates the causes of MoDER's gain, from the methods' (rounded) figures:
    composition = MoDER - MoDER without composition, calibration = MoDER - MoDER without calibration, on
    each Transfer; headroom = the share of the way from zero-shot (MoDER) or from MoDER without composition
    (composition alone) to the oracle that MoDER goes, on Transfer and on Transfer over new names."""
    moder, zeroshot, bare, oracle = (figures[m] for m in ("moder", "zeroshot", "no_composition", "oracle"))
    headroom = {}
    for suffix, key in (("", "transfer"), ("_new", "transfer_new")):
        if key in moder:
            for name, base in (("moder", zeroshot), ("composition", bare)):
                share = headroom_share(moder[key], base[key], oracle[key])
                if share is not None:
                    headroom[f"{name}{suffix}"] = round(share, 3)
    return {
        "composition": _differences(moder, bare, TRANSFERS),
        "calibration": _differences(moder, figures["no_calibration"], TRANSFERS),
        "headroom": headroom,
    }
