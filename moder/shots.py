"""Few-shot training splits (`extract.shots`): N training images per class, drawn from the seed.

The draw is made once, by the extract stage, before any image is decoded; every later stage and every
method (MoDER, its baselines, the oracle) reads the same kept images from the training feature file,
which records them. Each class draws alone, without replacement, from a generator seeded by the run's
seed, the dataset's key and the class name: the same images in every run of that seed, and a class's
draw does not move when other classes or datasets are added, removed or reordered (MTIL's two orders
share their features).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moder.errors import UserError
from moder.world import seed_for


class ShotsError(UserError, ValueError):
    """A class has fewer training images than `extract.shots`; the message names the class and the split."""


def draw_shots(
    labels: Sequence[int], class_names: Sequence[str], shots: int, seed: int, dataset: str, where: str
) -> list[int]:
    """Positions, ascending, of the `shots` images kept per class of a split whose image i has class
    `labels[i]` (an index of `class_names`). A class with fewer images than `shots` (none included) is an
    error naming it, `where` naming the split: a protocol that trains some classes on fewer shots than it
    says is not the one reported, so it is refused rather than taken short."""
    by_class: list[list[int]] = [[] for _ in class_names]
    for position, label in enumerate(labels):
        by_class[label].append(position)
    kept = []
    for name, positions in zip(class_names, by_class, strict=True):
        if len(positions) < shots:
            raise ShotsError(
                f"extract.shots is {shots} but class {name!r} of {where} has {len(positions)} training "
                "image(s): lower extract.shots, or leave the class out of the dataset"
            )
        generator = torch.Generator().manual_seed(seed_for(seed, "shots", dataset, name))
        kept += [positions[i] for i in torch.randperm(len(positions), generator=generator)[:shots].tolist()]
    return sorted(kept)
