"""Training one task's experts jointly on cached image features."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from moder.errors import TrainingDiverged
from moder.experts import Experts
from moder.params import TrainParams
from moder.progress import Progress, progress_bar
from moder.prompts import PromptSet, class_chunks, classes_per_chunk, encode_prototypes, keep_frozen_prefix
from moder.text import TextTower

# Prompts encoded with gradient in one forward. Above it a step runs in two passes: every prototype
# without gradient (for the loss and its gradient with respect to the prototypes), then chunks of
# classes with gradient, each back-propagating its slice. Exact (a class's prototype depends on its
# prompts only) and bounded in memory, at the cost of one more forward.
GRAD_PROMPTS = 256


@dataclass(frozen=True)
class TrainedTask:
    """What training left for one task that evaluation reads: each class's prototype under its own
    expert (encoded once, at training time) and its prototype offset (moder.train.prototype_offsets)."""

    prototypes: Tensor  # [n_classes, d]
    offsets: Tensor  # [n_classes]


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
    config: TrainParams,
    *,
    seed: int,
    zeroshot: Tensor | None = None,
    negatives: Tensor | None = None,
    anchors: tuple[Tensor, Tensor] | None = None,
    rows: Tensor | None = None,
    progress: Progress = False,
) -> TrainResult:
    """Cross-entropy over the task's classes, logits = scale * cosine(image, prototype).

    Every step encodes all of the task's classes, each with its own expert, batched (in chunks of
    GRAD_PROMPTS prompts); with `config.templates_per_step` each class reads that many of its templates,
    drawn afresh at every step (seeded). `negatives` (other classes' prototypes) add logit columns that no
    sample belongs to: text embeddings only, no image is replayed. `anchors` = (stored mean image feature
    of earlier classes [A, d], the `negatives` column of each [A]): with `config.anchor_earlier`, each
    centroid must still be classified as its own stored prototype, which keeps the new prototypes from
    attracting earlier classes' images (statistics stored at those classes' training, not images).
    `rows[c]` is the expert class c reads (default: its own; all zeros: one expert shared by every class).
    `seed` draws the batches and the templates.
    """
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"{features.shape[0]} features but {labels.shape[0]} labels")
    class_rows = torch.arange(prompts.n_classes) if rows is None else rows
    if len(class_rows) != prompts.n_classes or int(class_rows.max()) >= len(experts):
        raise ValueError(f"{len(experts)} experts for {prompts.n_classes} classes")
    if config.reg_zeroshot > 0 and zeroshot is None:
        raise ValueError("reg_zeroshot > 0 needs the zero-shot prototypes")
    if config.anchor_earlier > 0 and anchors is not None and negatives is None:
        raise ValueError("anchors label earlier centroids with their prototypes among the negatives: none given")
    anchors = anchors if config.anchor_earlier > 0 else None
    generator = torch.Generator().manual_seed(seed)
    return _train(
        tower, prompts, experts, features, labels, config, generator, zeroshot, negatives, anchors, class_rows, progress
    )


def _train(
    tower: TextTower,
    prompts: PromptSet,
    experts: Experts,
    features: Tensor,
    labels: Tensor,
    config: TrainParams,
    generator: torch.Generator,
    zeroshot: Tensor | None,
    negatives: Tensor | None,
    anchors: tuple[Tensor, Tensor] | None,
    class_rows: Tensor,
    progress: Progress,
) -> TrainResult:
    # the blocks before the experts' first give the same hidden states at every step: run them once
    prompts = keep_frozen_prefix(tower, prompts, experts.first_layer)
    parameters = [p.detach().clone().requires_grad_(True) for p in experts.parameters()]
    trainable = experts.with_parameters(parameters)
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    # the loss runs on the CPU, where encode_prototypes returns the prototypes, whatever the tower's device
    features = F.normalize(features.float(), dim=-1).cpu()
    labels = labels.cpu()
    centroids = class_centroids(features, labels, prompts.n_classes) if config.align > 0 else None
    steps_per_epoch = math.ceil(features.shape[0] / config.batch_size)
    losses: list[float] = []
    bar = progress_bar(progress, total=config.epochs * steps_per_epoch, desc="train experts", leave=False)
    for _ in range(config.epochs):
        order = torch.randperm(features.shape[0], generator=generator)
        for start in range(0, features.shape[0], config.batch_size):
            batch = order[start : start + config.batch_size]
            step_prompts = sample_templates(prompts, config.templates_per_step, generator)
            loss_of = partial(_loss, features[batch], labels[batch], config, zeroshot, negatives, centroids, anchors)
            optimizer.zero_grad(set_to_none=True)
            loss = _backward(tower, step_prompts, trainable, class_rows, loss_of)
            if not torch.isfinite(loss):
                bar.close()
                raise TrainingDiverged(
                    f"training diverged: the loss is {loss.item()} at step {len(losses) + 1} "
                    f"(lr {config.lr}); lower train.lr"
                )
            optimizer.step()
            losses.append(loss.item())
            bar.update()
    bar.close()
    return TrainResult(experts.with_parameters([p.detach() for p in parameters]), losses)


def _loss(
    features: Tensor,
    labels: Tensor,
    config: TrainParams,
    zeroshot: Tensor | None,
    negatives: Tensor | None,
    centroids: Tensor | None,
    anchors: tuple[Tensor, Tensor] | None,
    prototypes: Tensor,
) -> Tensor:
    classifier = prototypes if negatives is None else torch.cat([prototypes, negatives.to(prototypes)])
    loss = F.cross_entropy(config.logit_scale * features @ classifier.T, labels)
    if zeroshot is not None and config.reg_zeroshot > 0:
        loss = loss + config.reg_zeroshot * (1 - (prototypes * zeroshot.to(prototypes)).sum(-1)).mean()
    if centroids is not None:
        loss = loss + config.align * (1 - (prototypes * centroids).sum(-1)).mean()
    if anchors is not None:
        anchor_features, columns = anchors[0].to(prototypes), anchors[1].to(prototypes.device)
        anchor_logits = config.logit_scale * anchor_features @ classifier.T
        loss = loss + config.anchor_earlier * F.cross_entropy(anchor_logits, prototypes.shape[0] + columns)
    return loss


def class_centroids(features: Tensor, labels: Tensor, n_classes: int) -> Tensor:
    """[n_classes, d] each class's mean normalised image feature, renormalised (zeros for a class with no image)."""
    sums = torch.zeros(n_classes, features.shape[1], dtype=features.dtype, device=features.device)
    return F.normalize(sums.index_add_(0, labels, F.normalize(features, dim=-1)), dim=-1)


def sample_templates(prompts: PromptSet, per_class: int | None, generator: torch.Generator) -> PromptSet:
    """`per_class` of each class's prompts, drawn independently per class without replacement (all of
    them, and no draw from `generator`, when `per_class` is None or not below the prompts per class)."""
    if per_class is None or per_class >= prompts.per_class:
        return prompts
    chosen = torch.rand(prompts.n_classes, prompts.per_class, generator=generator).argsort(dim=1)[:, :per_class]
    rows = (torch.arange(prompts.n_classes)[:, None] * prompts.per_class + chosen).reshape(-1)
    return prompts.rows(rows, prompts.n_classes, per_class)


def _backward(
    tower: TextTower, prompts: PromptSet, experts: Experts, class_rows: Tensor, loss_of: Callable[[Tensor], Tensor]
) -> Tensor:
    """loss_of(every class's prototype), back-propagated into the experts; in class chunks of at most
    GRAD_PROMPTS prompts when the task has more (see GRAD_PROMPTS)."""
    if prompts.n_classes * prompts.per_class <= GRAD_PROMPTS:
        loss = loss_of(encode_prototypes(tower, prompts, experts, class_rows))
        loss.backward()
        return loss
    chunk = classes_per_chunk(prompts.per_class, GRAD_PROMPTS)
    with torch.no_grad():
        prototypes = encode_prototypes(tower, prompts, experts, class_rows, chunk_classes=chunk)
    prototypes.requires_grad_(True)
    loss = loss_of(prototypes)
    loss.backward()
    gradient = prototypes.grad
    assert gradient is not None  # the loss reads every prototype
    for classes in class_chunks(prompts.n_classes, chunk):
        part = encode_prototypes(tower, prompts.select(classes), experts, class_rows[classes])
        part.backward(gradient[classes])
    return loss.detach()


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
