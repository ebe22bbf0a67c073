"""Fake `imagefolder` dataset: root/{train,test}/<class_folder>/<n>.png, made-up class names."""

from __future__ import annotations

from itertools import product
from pathlib import Path

import numpy as np
from PIL import Image

_COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "pink", "cyan"]
_SHAPES = ["circle", "square", "star", "triangle", "hexagon", "ring", "cross", "diamond"]


def class_names(n_classes: int) -> list[str]:
    """n made-up class names ("red circle", "red square", ...), already in sorted order."""
    return sorted(f"{colour} {shape}" for colour, shape in product(_COLOURS, _SHAPES))[:n_classes]


def save_image(path: Path, rng: np.random.Generator, size: int = 8) -> None:
    """A tiny random RGB image at `path` (format from its suffix), creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def write(root: Path, n_classes: int, per_class: int, seed: int = 0, suffix: str = ".png") -> None:
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for name in class_names(n_classes):
            for k in range(per_class):
                save_image(root / split / name.replace(" ", "_") / f"{k}{suffix}", rng)
