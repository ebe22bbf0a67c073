"""Contrastive pre-training of a tiny CLIP on the clean rendering domain of the embedded world."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from moder.clip import OpenClipModel, normalize_images
from moder.errors import TrainingDiverged
from moder.metrics import accuracy
from moder.params import DomainParams, PretrainParams
from moder.progress import Progress, progress_bar
from moder.prompts import zeroshot_prototypes
from moder.text import TextTower
from moder.world import World, render, seed_for


@dataclass(frozen=True)
class PretrainResult:
    losses: list[float]  # one per step
    accuracy: float  # zero-shot accuracy (percent) on a fresh clean render of every class


def _caption_tokens(tower: TextTower, world: World, captions: list[str], choice: Tensor) -> Tensor:
    """Tokens of one caption per class: class c reads captions[choice[c]]."""
    names = world.class_names
    return tower.tokenize([captions[int(t)].format(name) for t, name in zip(choice, names, strict=True)])


def _learning_rate(step: int, config: PretrainParams) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def pretrain_clip(
    model: OpenClipModel,
    tower: TextTower,
    world: World,
    config: PretrainParams,
    *,
    seed: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    progress: Progress = False,
) -> PretrainResult:
    """Train every weight of `model` in place; images are rendered afresh at every step.

    Each step contrasts a batch of images with one caption per class of the world (a
    random template each step): image-to-caption cross-entropy, plus caption-to-image with
    every image of the caption's class counted as a positive. Images are rendered in `config.domain`,
    captions filled from `config.captions`.
    """
    domain, captions = config.domain, config.captions
    generator = torch.Generator().manual_seed(seed_for(seed, "pretrain"))
    model.train().requires_grad_(True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    keep = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": keep, "weight_decay": 0.0}], lr=config.lr
    )
    n_classes = len(world.class_names)
    device = tower.device  # images are rendered on the CPU and go to the model
    losses: list[float] = []
    for step in progress_bar(progress, range(config.steps), desc="pretrain CLIP"):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, config)
        labels = torch.randint(n_classes, (config.batch_size,), generator=generator)
        images = normalize_images(render(world, domain, "pretrain", labels, generator), mean, std).to(device)
        labels = labels.to(device)
        tokens = _caption_tokens(
            tower, world, captions, torch.randint(len(captions), (n_classes,), generator=generator)
        )
        image_features = F.normalize(model.encode_image(images), dim=-1)
        text_features = tower.encode(tokens)
        logits = model.logit_scale.exp().clamp(max=100) * image_features @ text_features.T
        image_to_text = F.cross_entropy(logits, labels)
        present = labels.unique()
        log_probs = logits[:, present].T.log_softmax(dim=1)  # [present classes, batch]
        positive = labels[None, :] == present[:, None]
        text_to_image = -torch.logsumexp(log_probs.masked_fill(~positive, -math.inf), dim=1).mean()
        loss = (image_to_text + text_to_image) / 2
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"pre-training diverged: the loss is {loss.item()} at step {step + 1} "
                f"(lr {config.lr}); lower pretrain.lr"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval().requires_grad_(False)
    return PretrainResult(losses, clean_accuracy(model, tower, world, domain, captions, mean, std, seed))


@torch.no_grad()
def clean_accuracy(
    model: OpenClipModel,
    tower: TextTower,
    world: World,
    domain: DomainParams,
    captions: list[str],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    seed: int,
    per_class: int = 16,
) -> float:
    """Zero-shot accuracy with the caption ensemble on a held-out render of the pre-training domain."""
    generator = torch.Generator().manual_seed(seed_for(seed, "pretrain-test"))
    labels = torch.arange(len(world.class_names)).repeat_interleave(per_class)
    images = normalize_images(render(world, domain, "pretrain", labels, generator), mean, std)
    features = model.encode_image(images.to(tower.device)).cpu()
    return accuracy(features, labels, zeroshot_prototypes(tower, world.class_names, captions))
