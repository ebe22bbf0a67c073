"""Fake Caltech-101: root/caltech101/101_ObjectCategories/<folder>/image_0001.jpg ..., BACKGROUND_Google
included; per_class images per class in all. An image of class c is 8 pixels high and 8 + c wide,
every third one grayscale (the real set has grayscale images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from moder.datasets.caltech101 import BACKGROUND, FOLDERS


def write(root: Path, n_classes: int, per_class: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    images_dir = root / "caltech101" / "101_ObjectCategories"
    # The background folder is not a class: its images must not show up in any split.
    for c, folder in [(0, BACKGROUND), *enumerate(FOLDERS[:n_classes])]:
        (images_dir / folder).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            shape = (8, 8 + c) if k % 3 == 2 else (8, 8 + c, 3)
            image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
            image.save(images_dir / folder / f"image_{k + 1:04d}.jpg")
