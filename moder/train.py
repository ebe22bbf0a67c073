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


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    logit_scale: float = 100.0
    reg_zeroshot: float = 0.0  # weight of mean (1 - cos(prototype, zero-shot prototype))
    seed: int = 0


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
    zeroshot: Tensor | None = None,
    negatives: Tensor | None = None,
    progress: bool = False,
) -> TrainResult:
    """Cross-entropy over the task's classes, logits = scale * cosine(image, prototype).

    Every step encodes all of the task's prompts, each class with its own expert, in one
    batched forward. `negatives` (earlier classes' stored prototypes) add logit columns
    that no sample belongs to: text embeddings only, no image is replayed.
    """
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"{features.shape[0]} features but {labels.shape[0]} labels")
    if len(experts) != prompts.n_classes:
        raise ValueError(f"{len(experts)} experts for {prompts.n_classes} classes")
    if config.reg_zeroshot > 0 and zeroshot is None:
        raise ValueError("reg_zeroshot > 0 needs the zero-shot prototypes")
    generator = torch.Generator().manual_seed(config.seed)
    parameters = [p.detach().clone().requires_grad_(True) for p in experts.parameters()]
    trainable = experts.with_parameters(parameters)
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    features = F.normalize(features.float(), dim=-1).to(tower.device)
    labels = labels.to(tower.device)
    class_rows = torch.arange(prompts.n_classes)
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
            if config.reg_zeroshot > 0:
                loss = loss + config.reg_zeroshot * (1 - (prototypes * zeroshot.to(prototypes)).sum(-1)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.update()
    bar.close()
    return TrainResult(experts.with_parameters([p.detach() for p in parameters]), losses)

