"""The accuracy of every task after one training step, for zero-shot, oracle and MoDER, in one line:
build every class's prototypes -> score each task in its label space -> explain the untrained classes.

Steps are 0-based positions in the task sequence throughout this module (`step` = the task just
trained); only the rows name them, by task name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moder.compose import compose_prototypes, displace_prototypes, smooth_toward_zeroshot
from moder.factory import ExpertFactory
from moder.hub import NULL_EXPERT, ExpertHub, Retrieval
from moder.metrics import class_accuracy, label_space, predict
from moder.names import normalized
from moder.params import Calibration, EvaluationSettings, Protocol
from moder.prompts import PromptSet
from moder.results import AccuracyRow, UnseenClassRow
from moder.tasks import TaskData
from moder.train import TrainedTask

ClassKey = tuple[str, str]  # (dataset, class name): the same name in two datasets is two classes


@dataclass(frozen=True)
class StepEvaluation:
    rows: list[AccuracyRow]
    unseen_classes: list[UnseenClassRow]


@dataclass(frozen=True)
class StepPrototypes:
    """Every class's prototype per method after one step, and what each untrained class retrieved."""

    zeroshot: dict[ClassKey, Tensor]
    oracle: dict[ClassKey, Tensor]  # MoDER with perfect retrieval: untrained classes use their own task's experts
    moder: dict[ClassKey, Tensor]  # own experts for trained classes, composed for the others
    no_composition: dict[ClassKey, Tensor]  # MoDER with the untrained classes left at their zero-shot prototypes
    retrieved: dict[ClassKey, str]
    similarity: dict[ClassKey, float]  # each untrained class's closest hub class (cosine of zero-shot prototypes)
    offsets: dict[ClassKey, float]  # subtracted from trained classes' scores (calibration), MoDER's and the oracle's


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
    """Accuracy of every task after training sequence[step] (0-based), for five methods:

    - `zeroshot`: every class's zero-shot prototype;
    - `moder`: tasks 0..step use their own experts (seen classes); the classes of later tasks
      get prototypes composed from `hub` (the experts of tasks 0..step), retrieved by zero-shot prototype;
    - `oracle`: MoDER with perfect retrieval: each class not yet trained uses its own task's expert
      (trained ahead of time) where MoDER composes one, smoothed toward zero-shot and calibrated exactly
      as MoDER's composed prototypes are, so it bounds what composition could reach, which is why
      `trained` holds every task of the sequence;
    - `no_composition`: MoDER with every class not yet trained left at its zero-shot prototype (own
      experts, smoothing and calibration unchanged): MoDER minus it is composition's own effect;
    - `no_calibration`: MoDER's prototypes scored without calibration offsets: MoDER minus it is
      calibration's effect.
    Tasks not yet trained are also scored over their new and their recurring names (`Names`), and each
    of their classes gets an `UnseenClassRow`.
    Trained prototypes are read from `trained`, never re-encoded: a step costs the composition of the
    classes not trained yet, so the whole sequence costs O(tasks), not O(tasks^2).
    """
    if len(trained) != len(sequence) or not 0 <= step < len(sequence):
        raise ValueError(f"step {step} with experts of {len(trained)} tasks for a sequence of {len(sequence)}")
    if sorted(set(hub.steps)) != [data.task.step for data in sequence[: step + 1]]:
        raise ValueError(f"the hub holds steps {sorted(set(hub.steps))}, not those of tasks 1..{step + 1}")
    prototypes = step_prototypes(factory, sequence, trained, hub, step, settings)
    protocol, offsets = settings.protocol, prototypes.offsets
    rows = [
        *accuracy_rows(sequence, step, protocol, "zeroshot", prototypes.zeroshot),
        *accuracy_rows(sequence, step, protocol, "oracle", prototypes.oracle, offsets),
        *accuracy_rows(sequence, step, protocol, "moder", prototypes.moder, offsets),
        *accuracy_rows(sequence, step, protocol, "no_composition", prototypes.no_composition, offsets),
        *accuracy_rows(sequence, step, protocol, "no_calibration", prototypes.moder),
    ]
    return StepEvaluation(rows, _unseen_class_rows(sequence, step, settings.protocol, prototypes))


def step_prototypes(
    factory: ExpertFactory,
    sequence: list[TaskData],
    trained: list[TrainedTask],
    hub: ExpertHub,
    step: int,
    settings: EvaluationSettings,
) -> StepPrototypes:
    """Every class's prototype per method after `step` (see `evaluate_step`), and the calibration offsets."""
    own: dict[ClassKey, Tensor] = {}  # each class's own expert's prototype, as evaluation reads it
    for data, task in zip(sequence, trained, strict=True):
        if task.prototypes.shape != data.zeroshot.shape:
            raise ValueError(
                f"task {data.task.name}: trained prototypes {list(task.prototypes.shape)} "
                f"for zero-shot prototypes {list(data.zeroshot.shape)}"
            )
        own.update(zip(class_keys(data), task.prototypes, strict=True))
    seen = [key for data in sequence[: step + 1] for key in class_keys(data)]
    zeroshot = {key: p for data in sequence for key, p in zip(class_keys(data), data.zeroshot, strict=True)}
    own_seen = {key: smooth_toward_zeroshot(own[key], zeroshot[key], settings.composition.alpha) for key in seen}
    moder, oracle, no_composition = dict(own_seen), dict(own_seen), {**zeroshot, **own_seen}
    retrieved: dict[ClassKey, str] = {}
    similarity: dict[ClassKey, float] = {}
    for data in sequence[step + 1 :]:
        task_prompts = factory.prompts(data.class_names, list(data.templates))
        composed = compose_unseen(factory, task_prompts, hub, data.zeroshot, settings)
        keys = class_keys(data)
        retrieved.update(zip(keys, _describe(composed, hub), strict=True))
        similarity.update(zip(keys, composed.best_similarity.tolist(), strict=True))
        moder.update(zip(keys, composed.prototypes, strict=True))
        perfect = smooth_toward_zeroshot(
            torch.stack([own[key] for key in keys]), data.zeroshot, settings.composition.alpha_unseen
        )
        oracle.update(zip(keys, perfect, strict=True))
    row = {key: r for r, key in enumerate(zip(hub.datasets, hub.class_names, strict=True))}  # the latest expert
    offsets = dict(
        zip(seen, calibration_offsets(settings.composition.calibrate, hub, [row[key] for key in seen]), strict=True)
    )
    return StepPrototypes(zeroshot, oracle, moder, no_composition, retrieved, similarity, offsets)


def calibration_offsets(calibrate: Calibration, hub: ExpertHub, rows: list[int]) -> list[float]:
    """What the score of the trained class at each of the hub's `rows` is lowered by: none, nothing; mean, the
    hub's mean offset for every trained class (it changes a ranking only where untrained classes compete);
    task, the mean offset of the class's own task, everywhere, so that tasks trained apart are calibrated
    against each other (Class-IL) and the ranking within a task never changes (the oracle is calibrated the
    same way). Means in float32, as training stored the offsets. Evaluation and `moder classify` both
    calibrate through this. (Per-class offsets were tried and reorder a task's classes: MTIL Last fell 20.)"""
    if calibrate == "none":
        return [0.0] * len(rows)
    if calibrate == "mean":
        return [torch.tensor(hub.offsets, dtype=torch.float32).mean().item()] * len(rows)
    groups: dict[tuple[int, str], list[float]] = {}
    for step, task, offset in zip(hub.steps, hub.tasks, hub.offsets, strict=True):
        groups.setdefault((step, task), []).append(offset)
    means = {key: torch.tensor(values, dtype=torch.float32).mean().item() for key, values in groups.items()}
    return [means[(hub.steps[r], hub.tasks[r])] for r in rows]


@dataclass(frozen=True)
class Composed:
    """Prototypes of classes the hub has not trained, and how each was made."""

    prototypes: Tensor  # [Q, d]
    retrieval: Retrieval
    opened: Tensor  # [Q] bool: composed (True), or left at zero-shot by the gate
    best_similarity: Tensor  # [Q] cosine of each query to its closest hub class (the null expert aside)


@torch.no_grad()
def compose_unseen(
    factory: ExpertFactory, prompts: PromptSet, hub: ExpertHub, zeroshot: Tensor, settings: EvaluationSettings
) -> Composed:
    """Retrieve by zero-shot prototype; where the gate opens, compose the retrieved experts (or, in the
    displacement space, move the zero-shot prototype as theirs moved) and move the result toward zero-shot by
    `alpha_unseen`; where it stays shut, keep the zero-shot prototype.
    The one implementation evaluation and `moder classify` share."""
    retrieval = hub.query(zeroshot, settings.retrieval.k, settings.retrieval.temperature, settings.retrieval.null_score)
    best = torch.where(retrieval.indices == NULL_EXPERT, float("-inf"), retrieval.scores).max(dim=1).values
    gate = settings.retrieval.gate
    opened = torch.ones_like(best, dtype=torch.bool) if gate is None else best >= gate
    prototypes = zeroshot.float().clone()
    rows = opened.nonzero().squeeze(1)
    if len(rows):
        space = settings.composition.space
        if space == "displacement":
            composed = displace_prototypes(
                prototypes[rows], hub.moves(), retrieval.indices[rows], retrieval.weights[rows]
            )
        else:
            composed = compose_prototypes(
                factory.tower,
                prompts.select(rows),
                hub.experts,
                factory.null(),
                retrieval.indices[rows],
                retrieval.weights[rows],
                space,
            )
        prototypes[rows] = smooth_toward_zeroshot(composed, prototypes[rows], settings.composition.alpha_unseen)
    return Composed(prototypes, retrieval, opened, best)


def class_keys(data: TaskData) -> list[ClassKey]:
    """(dataset, class name) of each class of a task, in its order: how prototypes are keyed across tasks."""
    return [(data.task.dataset, name) for name in data.class_names]


def _describe(composed: Composed, hub: ExpertHub) -> list[str]:
    """Per query: "hub class [its task] weight; ..." in retrieval order ("null" for the frozen model),
    or "zero-shot (gate shut)" where the gate kept the zero-shot prototype."""
    retrieval = composed.retrieval
    return [
        "; ".join(
            f"null {w:.3f}" if r == NULL_EXPERT else f"{hub.class_names[r]} [{hub.tasks[r]}] {w:.3f}"
            for r, w in zip(rows, weights, strict=True)
        )
        if opened
        else "zero-shot (gate shut)"
        for rows, weights, opened in zip(
            retrieval.indices.tolist(), retrieval.weights.tolist(), composed.opened.tolist(), strict=True
        )
    ]


def _unseen_class_rows(
    sequence: list[TaskData], step: int, protocol: Protocol, prototypes: StepPrototypes
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
        trained = trained_names(sequence, step)
        rows += [
            UnseenClassRow(
                sequence[step].task.name,
                data.task.name,
                key[1],
                "recurring" if normalized(key[1]) in trained else "new",
                float(per_class["zeroshot"][position[key]]),
                float(per_class["moder"][position[key]]),
                prototypes.similarity[key],
                prototypes.retrieved[key],
            )
            for key in class_keys(data)
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
    return None if not offsets else torch.tensor([offsets.get(key, 0.0) for key in keys])


def trained_names(sequence: list[TaskData], step: int) -> set[str]:
    """The names (normalised: moder.names.normalized) of every class trained in steps 0..step, in any dataset."""
    return {normalized(name) for data in sequence[: step + 1] for name in data.class_names}


def accuracy_rows(
    sequence: list[TaskData],
    step: int,
    protocol: Protocol,
    method: str,
    prototypes: dict[ClassKey, Tensor],
    offsets: dict[ClassKey, float] | None = None,
) -> list[AccuracyRow]:
    """Every task's accuracy after `step` (0-based) with one prototype per (dataset, class), in the
    protocol's label spaces; `offsets` are subtracted from their classes' scores. A task not yet trained
    is also scored over the test images of its new names and of its recurring ones (`Names`), each
    where it has any."""
    rows = []
    trained = trained_names(sequence, step)
    for index, data in enumerate(sequence):
        keys, labels = _label_space(sequence, step, protocol, index)
        right = predict(data.test_features, torch.stack([prototypes[key] for key in keys]), _shift(keys, offsets))
        right = right == labels
        subsets: dict[str, Tensor] = {"all": torch.ones_like(right)}
        if index > step:
            recurring = torch.tensor([normalized(name) in trained for name in data.class_names])[data.test_labels]
            subsets |= {"new": ~recurring, "recurring": recurring}
        rows += [
            AccuracyRow(
                sequence[step].task.name,
                data.task.name,
                method,
                100.0 * right[members].float().mean().item(),
                int(members.sum()),
                names,
            )
            for names, members in subsets.items()
            if members.any()
        ]
    return rows
