"""One factory for experts: the prompts a kind reads, fresh experts, and the null expert."""

from __future__ import annotations

import torch

from moder.experts import (
    ContextExperts,
    Experts,
    LoraExperts,
    init_context_experts,
    init_lora_experts,
    lora_targets,
)
from moder.params import ExpertParams
from moder.prompts import PromptSet, keep_frozen_prefix, template_prompts
from moder.text import TextTower


class ExpertFactory:
    """Builds experts of one spec for one text tower.

    Context experts read "<context> <name>." with the context initialised from the spec's
    phrase; LoRA experts read the template ensemble, like the zero-shot classifier.
    """

    def __init__(self, tower: TextTower, spec: ExpertParams, templates: list[str]) -> None:
        self.tower, self.spec, self.templates = tower, spec, list(templates)
        if spec.kind == "context":
            self._init_ctx = tower.context_prompts(["x"], spec.context.init)[1]
        elif spec.kind == "lora":
            self._shapes = tower.lora_shapes(lora_targets(tower.n_layers, spec.lora.layers, list(spec.lora.modules)))
        else:
            raise ValueError(f"unknown expert kind {spec.kind!r}; allowed: context, lora")

    @property
    def first_layer(self) -> int:
        """The first text block this factory's experts change (0 for context experts: the embedding's tokens)."""
        return self.null().first_layer

    @property
    def scaling(self) -> float:
        return self.spec.lora.alpha / self.spec.lora.rank

    def prompts(
        self, class_names: list[str], templates: list[str] | None = None, *, keep_prefix: bool = False
    ) -> PromptSet:
        """The prompts experts of this kind read for `class_names`; LoRA experts use `templates`
        (a dataset's own templates) or else the factory's. With `keep_prefix`, their hidden states before the
        experts' first block are computed now and kept (`keep_frozen_prefix`): for prompts encoded again and again."""
        if self.spec.kind == "context":
            return PromptSet(self.tower.context_prompts(class_names, self.spec.context.init)[0], len(class_names), 1)
        prompts = template_prompts(self.tower, class_names, list(templates or self.templates))
        return keep_frozen_prefix(self.tower, prompts, self.first_layer) if keep_prefix else prompts

    def new(self, n: int, generator: torch.Generator) -> Experts:
        if self.spec.kind == "context":
            return init_context_experts(n, self._init_ctx)
        return init_lora_experts(n, self._shapes, self.spec.lora.rank, self.scaling, generator)

    def null(self) -> Experts:
        """The frozen model as an expert: the init phrase itself, or a zero LoRA delta."""
        if self.spec.kind == "context":
            return ContextExperts(self._init_ctx.unsqueeze(0).clone())
        rank = self.spec.lora.rank
        return LoraExperts(
            {t: torch.zeros(1, rank, i) for t, (o, i) in self._shapes.items()},
            {t: torch.zeros(1, o, rank) for t, (o, i) in self._shapes.items()},
            self.scaling,
        )
