"""Fake ImageNet-R: root/imagenet-r/<wnid>/<rendition>_<n>.jpg, per_class images per class in all (the
adapter makes the split)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moder.datasets import imagenet_r
from tests.layouts.imagefolder import save_image

_RENDITIONS = ["art", "cartoon", "sketch", "toy", "origami", "painting"]


def wnids(n_classes: int) -> list[str]:
    """The first n of the catalog's wnids (label order)."""
    catalog_file = Path(imagenet_r.__file__).with_name("catalog") / "imagenet-r.json"
    return json.loads(catalog_file.read_text())["wnids"][:n_classes]


def write(root: Path, n_classes: int, per_class: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for wnid in wnids(n_classes):
        for k in range(per_class):
            save_image(root / "imagenet-r" / wnid / f"{_RENDITIONS[k % len(_RENDITIONS)]}_{k}.jpg", rng)
