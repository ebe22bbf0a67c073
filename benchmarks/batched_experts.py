"""One batched forward of N = 100 per-class experts vs a loop over experts (target >= 5x).

Baseline: the loop a naive implementation runs, one forward per class with that class's
expert. Both use the same truncation; the experts are the committed expert settings
(params.yaml's `expert`) as LoRA on the ViT-B-16 text tower and, second, as context experts.
"""

from __future__ import annotations

import torch
from _common import CLASS_NAMES, TEMPLATE, committed, lora_label, median_seconds, vit_b16

from moder.experts import ContextExperts, Experts, LoraExperts
from moder.factory import ExpertFactory
from moder.text import TextTower


def compare(tower: TextTower, factory: ExpertFactory, experts: Experts, label: str) -> None:
    prompts = factory.prompts(CLASS_NAMES)
    n = len(CLASS_NAMES)
    one = torch.zeros(1, dtype=torch.long)

    def looped() -> torch.Tensor:
        return torch.cat(
            [tower.encode(prompts.tokens[c : c + 1], experts.select(torch.tensor([c])), one) for c in range(n)]
        )

    def batched() -> torch.Tensor:
        return tower.encode(prompts.tokens, experts, torch.arange(n))

    with torch.no_grad():
        loop_time = median_seconds(looped, repeats=7)
        batch_time = median_seconds(batched, repeats=7)
        difference = (looped() - batched()).abs().max().item()
    print(f"{label}: N={n} experts, one prompt each, {torch.get_num_threads()} threads")
    print(f"  baseline loop over experts : {loop_time * 1000:8.1f} ms")
    print(f"  one batched forward        : {batch_time * 1000:8.1f} ms")
    print(f"  speed-up (loop / batched)  : {loop_time / batch_time:8.2f}x   (target >= 5x)")
    print(f"  max abs difference         : {difference:.2e}")


def main() -> None:
    _, tower = vit_b16()
    generator = torch.Generator().manual_seed(0)
    settings = committed().expert
    lora = ExpertFactory(tower, settings.model_copy(update={"kind": "lora"}), [TEMPLATE])
    experts = lora.new(len(CLASS_NAMES), generator)
    assert isinstance(experts, LoraExperts)
    for target, b in experts.b.items():
        experts.b[target] = torch.randn(b.shape, generator=generator) * 0.01
    compare(tower, lora, experts, lora_label(settings.lora))
    context = ExpertFactory(tower, settings.model_copy(update={"kind": "context"}), [TEMPLATE])
    ctx = context.new(len(CLASS_NAMES), generator)
    assert isinstance(ctx, ContextExperts)
    ctx.ctx += 0.01 * torch.randn(ctx.ctx.shape, generator=generator)
    compare(tower, context, ctx, f"context tokens ({ctx.ctx.shape[1]})")


if __name__ == "__main__":
    main()
