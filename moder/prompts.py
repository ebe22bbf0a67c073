"""Prompts per class and the prototypes (class text embeddings) they encode to."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from moder.experts import Experts
from moder.names import check_class_names, check_prompt_templates
from moder.text import TextTower

# Prompts (token sequences) per forward pass where no gradient is kept: bounds memory whatever the class
# and template counts (at ViT-B-16's width, about 0.4 GB of activations); results do not depend on it.
NO_GRAD_PROMPTS = 2048


def classes_per_chunk(prompts_per_class: int, max_prompts: int = NO_GRAD_PROMPTS) -> int:
    """How many classes' prompts fit in one forward of at most `max_prompts` sequences (at least one class)."""
    return max(1, max_prompts // prompts_per_class)


def class_chunks(n_classes: int, size: int) -> Iterator[Tensor]:
    """Class indices 0..n_classes-1 in consecutive chunks of at most `size`."""
    for start in range(0, n_classes, size):
        yield torch.arange(start, min(start + size, n_classes))


@dataclass(frozen=True)
class PromptSet:
    """`per_class` token sequences for each of `n_classes` classes, class-major."""

    tokens: Tensor  # [n_classes * per_class, L]
    n_classes: int
    per_class: int

    def select(self, classes: Tensor) -> PromptSet:
        rows = (classes[:, None] * self.per_class + torch.arange(self.per_class)).reshape(-1)
        return PromptSet(self.tokens[rows.to(self.tokens.device)], len(classes), self.per_class)


def template_prompts(tower: TextTower, class_names: list[str], templates: list[str]) -> PromptSet:
    """CLIP's template ensemble: every template filled with every class name."""
    check_prompt_templates(templates)
    check_class_names(class_names)
    texts = [template.format(name) for name in class_names for template in templates]
    return PromptSet(tower.tokenize(texts), len(class_names), len(templates))


def encode_prototypes(
    tower: TextTower,
    prompts: PromptSet,
    experts: Experts | None = None,
    class_expert: Tensor | None = None,
    chunk_classes: int | None = None,
) -> Tensor:
    """L2-normalised mean of each class's normalised prompt embeddings -> [n_classes, d], on the CPU
    whatever the tower's device (the image features they meet are stored there).

    With experts, class c is encoded by expert row `class_expert[c]`. `chunk_classes` bounds
    memory for no-grad encodings (see `classes_per_chunk`); None encodes every class in one forward.
    """
    if experts is not None and class_expert is None:
        raise ValueError("experts need class_expert: which expert row encodes each class")
    parts = []
    for classes in class_chunks(prompts.n_classes, chunk_classes or prompts.n_classes):
        chunk = prompts.select(classes)
        index = None if class_expert is None else class_expert[classes]
        embeddings = tower.encode(chunk.tokens, experts, index, sequences_per_expert=prompts.per_class)
        parts.append(embeddings.view(len(classes), prompts.per_class, -1).mean(dim=1))
    return F.normalize(torch.cat(parts), dim=-1).cpu()


@torch.no_grad()
def zeroshot_prototypes(tower: TextTower, class_names: list[str], templates: list[str]) -> Tensor:
    """The frozen model's template-ensembled class embeddings: keys, queries and the zero-shot classifier."""
    return encode_prototypes(
        tower, template_prompts(tower, class_names, templates), chunk_classes=classes_per_chunk(len(templates))
    )
