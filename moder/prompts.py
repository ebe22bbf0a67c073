"""Prompts per class and the prototypes (class text embeddings) they encode to."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from moder.experts import Experts
from moder.names import check_class_names, check_prompt_templates
from moder.text import TextTower

# Prompts (token sequences) per forward pass where no gradient is kept: bounds memory whatever the class
# and template counts (at ViT-B-16's width, about 0.4 GB of activations); results do not depend on it.
NO_GRAD_PROMPTS = 2048

# Hidden states a prompt set keeps for reuse (`keep_frozen_prefix`), in floats: 1 GiB in fp32. At real shapes
# (ViT-B-16, width 512, prompts truncated to the longest) the largest task of MTIL Order I keeps 23 M
# (caltech101: 3,434 prompts of 13 tokens, 87 MiB), all of MTIL Order I 65 M (250 MiB, what the finetune
# baseline keeps), all of ImageNet-R 131 M (16,000 prompts of 16 tokens, 500 MiB). A larger set keeps none
# and is encoded whole each time: slower, never more memory.
KEPT_PREFIX_FLOATS = 2**28


def classes_per_chunk(prompts_per_class: int, max_prompts: int = NO_GRAD_PROMPTS) -> int:
    """How many classes' prompts fit in one forward of at most `max_prompts` sequences (at least one class)."""
    return max(1, max_prompts // prompts_per_class)


def class_chunks(n_classes: int, size: int) -> Iterator[Tensor]:
    """Class indices 0..n_classes-1 in consecutive chunks of at most `size`."""
    for start in range(0, n_classes, size):
        yield torch.arange(start, min(start + size, n_classes))


@dataclass(frozen=True)
class PromptSet:
    """`per_class` token sequences for each of `n_classes` classes, class-major; with `prefix`, each
    sequence's hidden states entering text block `prefix_layers` (`keep_frozen_prefix`)."""

    tokens: Tensor  # [n_classes * per_class, L]
    n_classes: int
    per_class: int
    prefix: Tensor | None = None  # [n_classes * per_class, L', width]
    prefix_layers: int = 0

    def rows(self, rows: Tensor, n_classes: int, per_class: int) -> PromptSet:
        """The prompts at `rows` (with their kept hidden states), as `n_classes` classes of `per_class`."""
        rows = rows.to(self.tokens.device)
        prefix = None if self.prefix is None else torch.index_select(self.prefix, 0, rows)
        return PromptSet(torch.index_select(self.tokens, 0, rows), n_classes, per_class, prefix, self.prefix_layers)

    def select(self, classes: Tensor) -> PromptSet:
        rows = (classes[:, None] * self.per_class + torch.arange(self.per_class)).reshape(-1)
        return self.rows(rows, len(classes), self.per_class)

    @property
    def kept(self) -> tuple[Tensor, int] | None:
        """(hidden states, the block they enter), as `TextTower.encode` reads them; None if none are kept."""
        return None if self.prefix is None else (self.prefix, self.prefix_layers)


def keep_frozen_prefix(tower: TextTower, prompts: PromptSet, layers: int) -> PromptSet:
    """`prompts` keeping their hidden states entering block `layers`, computed once without gradient (in
    chunks of NO_GRAD_PROMPTS), so that every later encoding by experts acting from block `layers` on runs
    only those blocks. Unchanged where nothing is frozen (`layers` 0), where that prefix is already kept, or
    where it would pass KEPT_PREFIX_FLOATS."""
    if layers == 0 or (prompts.prefix is not None and prompts.prefix_layers == layers):
        return prompts
    tokens = prompts.tokens[:, : tower.sequence_length(prompts.tokens)]
    if tokens.numel() * tower.width > KEPT_PREFIX_FLOATS:
        return replace(prompts, prefix=None, prefix_layers=0)
    hidden = torch.empty(*tokens.shape, tower.width, dtype=tower.cast_dtype, device=tokens.device)
    for start in range(0, tokens.shape[0], NO_GRAD_PROMPTS):
        hidden[start : start + NO_GRAD_PROMPTS] = tower.prefix(tokens[start : start + NO_GRAD_PROMPTS], layers)
    return replace(prompts, prefix=hidden, prefix_layers=layers)


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
        embeddings = tower.encode(
            chunk.tokens, experts, index, sequences_per_expert=prompts.per_class, prefix=chunk.kept
        )
        parts.append(embeddings.view(len(classes), prompts.per_class, -1).mean(dim=1))
    return F.normalize(torch.cat(parts), dim=-1).cpu()


@torch.no_grad()
def frozen_prototypes(tower: TextTower, prompts: PromptSet) -> Tensor:
    """Each class's prototype under the frozen model (from the kept hidden states, if any)."""
    return encode_prototypes(tower, prompts, chunk_classes=classes_per_chunk(prompts.per_class))


def zeroshot_prototypes(tower: TextTower, class_names: list[str], templates: list[str]) -> Tensor:
    """The frozen model's template-ensembled class embeddings: keys, queries and the zero-shot classifier."""
    return frozen_prototypes(tower, template_prompts(tower, class_names, templates))
