"""Truncated vs full 77-token text encoding on the ViT-B-16 text tower (target >= 4x).

Baseline: open_clip's own `encode_text`, which always runs the full context. Prompts:
CIFAR-100's 100 class names in "a photo of a {}.".
"""

from __future__ import annotations

import torch
from _common import CLASS_NAMES, TEMPLATE, median_seconds, vit_b16


def main() -> None:
    model, tower = vit_b16()
    tokens = tower.tokenize([TEMPLATE.format(name) for name in CLASS_NAMES])
    with torch.no_grad():
        baseline = median_seconds(lambda: model.encode_text(tokens, normalize=True))
        full = median_seconds(lambda: tower.encode(tokens, truncate=False))
        truncated = median_seconds(lambda: tower.encode(tokens))
        difference = (tower.encode(tokens) - model.encode_text(tokens, normalize=True)).abs().max().item()
    print(f"text encoding, ViT-B-16 text tower, {len(CLASS_NAMES)} prompts, {torch.get_num_threads()} threads")
    print(f"  baseline open_clip encode_text (77 tokens): {baseline * 1000:8.1f} ms")
    print(f"  moder TextTower, full 77 tokens           : {full * 1000:8.1f} ms")
    print(f"  moder TextTower, truncated to {tower.sequence_length(tokens):2d} tokens  : {truncated * 1000:8.1f} ms")
    print(f"  speed-up (baseline / truncated)           : {baseline / truncated:8.2f}x   (target >= 4x)")
    print(f"  max abs difference to baseline            : {difference:.2e}")


if __name__ == "__main__":
    main()
