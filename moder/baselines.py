"""Baselines scored beside MoDER in the same label spaces (`zeroshot` and `oracle` live in evaluate_step)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from moder.evaluation import accuracy_rows
from moder.factory import ExpertFactory
from moder.params import Protocol, TrainParams
from moder.prompts import classes_per_chunk, encode_prototypes
from moder.results import AccuracyRow
from moder.tasks import Task, TaskData
from moder.train import train_experts


def finetune_rows(
    factory: ExpertFactory,
    sequence: list[TaskData],
    train_sets: list[tuple[Tensor, Tensor]],
    *,
    config: TrainParams,
    seed_for: Callable[[Task], int],
    protocol: Protocol,
    generator: torch.Generator,
) -> list[AccuracyRow]:
    """The naive continual baseline: one LoRA shared by every class (`factory` must make LoRA experts),
    trained task after task with cross-entropy over the current task's classes, every task scored
    after each step. `train_sets[i]` holds task i's training features and labels."""
    shared = factory.new(1, generator)
    rows: list[AccuracyRow] = []
    # each task's hidden states before the shared LoRA's first block, kept: every step encodes every task
    prompts = [factory.prompts(d.class_names, list(d.templates), keep_prefix=True) for d in sequence]
    for step, (data, (features, labels)) in enumerate(zip(sequence, train_sets, strict=True)):
        everyone = torch.zeros(len(data.class_names), dtype=torch.long)
        shared = train_experts(
            factory.tower, prompts[step], shared, features, labels, config, seed=seed_for(data.task), rows=everyone
        ).experts
        with torch.no_grad():
            table = {
                (d.task.dataset, name): p
                for d, task_prompts in zip(sequence, prompts, strict=True)
                for name, p in zip(
                    d.class_names,
                    encode_prototypes(
                        factory.tower,
                        task_prompts,
                        shared,
                        torch.zeros(len(d.class_names), dtype=torch.long),
                        chunk_classes=classes_per_chunk(task_prompts.per_class),
                    ),
                    strict=True,
                )
            }
        rows += accuracy_rows(sequence, step, protocol, "finetune", table)
    return rows
