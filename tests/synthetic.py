"""Generated image features for a known problem: the tests' stand-in for real images.

Each class's image features sit around its zero-shot prototype moved by a shift shared by
every class with the same attribute (as a domain shift acts on a colour wherever it appears),
so zero-shot is imperfect and training has something definite to fix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def shifted_features(
    prototypes: Tensor,
    groups: Tensor,
    samples_per_class: int,
    shift: float,
    noise: float,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Features [C * samples_per_class, d] and labels; `groups[c]` is class c's shifted attribute.

    Shift and noise are in units of the prototypes' mean distance from their centroid, so
    the difficulty does not depend on how spread out a (possibly untrained) model's
    prototypes are.
    """
    n_classes, dim = prototypes.shape
    centred = prototypes - prototypes.mean(dim=0)
    spread = centred.norm(dim=-1).mean()
    # Shifts lie in the span of the class differences: a random direction in a wide embedding
    # would be nearly orthogonal to every decision boundary and change nothing.
    mixing = torch.randn(int(groups.max()) + 1, n_classes, generator=generator)
    directions = F.normalize(mixing @ centred, dim=-1)
    targets = prototypes + spread * shift * directions[groups]
    labels = torch.arange(n_classes).repeat_interleave(samples_per_class)
    jitter = torch.randn(len(labels), dim, generator=generator) * spread * noise / dim**0.5
    return F.normalize(targets[labels] + jitter, dim=-1), labels
