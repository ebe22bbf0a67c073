"""Fake DTD: root/dtd/dtd/images/<class>/<class>_<n>.jpg and labels/{train1,test1}.txt. An image of
class c is 8 pixels high and 8 + c wide, every third one grayscale."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from moder.datasets import catalog


def write(root: Path, n_classes: int, per_class: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    data = root / "dtd" / "dtd"
    (data / "labels").mkdir(parents=True, exist_ok=True)
    textures = catalog("dtd").class_names[:n_classes]
    for offset, split in enumerate(("train", "test")):
        lines = []
        for c, texture in enumerate(textures):
            (data / "images" / texture).mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                name = f"{texture}_{1000 * offset + k + 1:04d}.jpg"
                shape = (8, 8 + c) if k % 3 == 2 else (8, 8 + c, 3)
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(data / "images" / texture / name)
                lines.append(f"{texture}/{name}\n")
        (data / "labels" / f"{split}1.txt").write_text("".join(lines))
