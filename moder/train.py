"""Training one task's experts jointly on cached image features."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from moder.experts import Experts
from moder.prompts import PromptSet, encode_prototypes
from moder.text import TextTower


class TrainingDiverged(ArithmeticError):
    """The loss became non-finite; nothing is returned (so nothing is saved)."""


@dataclass(frozen=True)
class TrainConfig:
    """Built by moder.params.TrainParams.config, the one home of the defaults."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    logit_scale: float
    reg_zeroshot: float  # weight of mean (1 - cos(prototype, zero-shot prototype))
    seed: int


@dataclass(frozen=True)
class TrainResult:
    experts: Experts
    losses: list[float]  # one per optimisation step


def train_experts(
    tower: TextTower,
    prompts: PromptSet,
    experts: Experts,
    features: Tensor,
    labels: Tensor,
    config: TrainConfig,
    *,
    zeroshot: Tensor | None = None,
    negatives: Tensor | None = None,
    rows: Tensor | None = None,
    progress: bool = False,
) -> TrainResult:
    """Cross-entropy over the task's classes, logits = scale * cosine(image, prototype).

    Every step encodes all of the task's prompts, each class with its own expert, in one
    batched forward. `negatives` (other classes' prototypes) add logit columns that no
    sample belongs to: text embeddings only, no image is replayed. `rows[c]` is the expert
    class c reads (default: its own; all zeros: one expert shared by every class).
    """
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"{features.shape[0]} features but {labels.shape[0]} labels")
    class_rows = torch.arange(prompts.n_classes) if rows is None else rows
    if len(class_rows) != prompts.n_classes or int(class_rows.max()) >= len(experts):
        raise ValueError(f"{len(experts)} experts for {prompts.n_classes} classes")
    if config.reg_zeroshot > 0 and zeroshot is None:
        raise ValueError("reg_zeroshot > 0 needs the zero-shot prototypes")
    return _train(tower, prompts, experts, features, labels, config, zeroshot, negatives, class_rows, progress)


def _train(
    tower: TextTower,
    prompts: PromptSet,
    experts: Experts,
    features: Tensor,
    labels: Tensor,
    config: TrainConfig,
    zeroshot: Tensor | None,
    negatives: Tensor | None,
    class_rows: Tensor,
    progress: bool,
) -> TrainResult:
    generator = torch.Generator().manual_seed(config.seed)
    parameters = [p.detach().clone().requires_grad_(True) for p in experts.parameters()]
    trainable = experts.with_parameters(parameters)
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    features = F.normalize(features.float(), dim=-1).to(tower.device)
    labels = labels.to(tower.device)
    steps_per_epoch = math.ceil(features.shape[0] / config.batch_size)
    losses: list[float] = []
    bar = tqdm(total=config.epochs * steps_per_epoch, desc="train experts", disable=not progress, leave=False)
    for _ in range(config.epochs):
        order = torch.randperm(features.shape[0], generator=generator)
        for start in range(0, features.shape[0], config.batch_size):
            batch = order[start : start + config.batch_size]
            prototypes = encode_prototypes(tower, prompts, trainable, class_rows)
            classifier = prototypes if negatives is None else torch.cat([prototypes, negatives.to(prototypes)])
            logits = config.logit_scale * features[batch] @ classifier.T
            loss = F.cross_entropy(logits, labels[batch])
            if zeroshot is not None and config.reg_zeroshot > 0:
                loss = loss + config.reg_zeroshot * (1 - (prototypes * zeroshot.to(prototypes)).sum(-1)).mean()
            if not torch.isfinite(loss):
                bar.close()
                raise TrainingDiverged(
                    f"training diverged: the loss is {loss.item()} at step {len(losses) + 1} "
                    f"(lr {config.lr}); lower train.lr"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.update()
    bar.close()
    return TrainResult(experts.with_parameters([p.detach() for p in parameters]), losses)


def prototype_offsets(prototypes: Tensor, zeroshot: Tensor, features: Tensor, labels: Tensor) -> Tensor:
    """How much closer each trained prototype came to the task's images of *other* classes.

    offset[c] = mean over images x not of class c of cos(x, prototype_c) - cos(x, zeroshot_c).
    Training pulls a prototype toward the task's domain as a whole, so next to untrained
    prototypes it also attracts images it should not; evaluation can subtract this gain.
    Computed from the current task's own images at training time: nothing is replayed later.
    """
    features = F.normalize(features.float(), dim=-1)
    gain = features @ (prototypes - zeroshot).T  # [N, C]
    others = labels[:, None] != torch.arange(prototypes.shape[0])[None, :]
    return (gain * others).sum(0) / others.sum(0).clamp(min=1)
