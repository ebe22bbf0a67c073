"""Fake FGVC-Aircraft: root/fgvc-aircraft-2013b/data/{variants.txt, images_variant_{train,test}.txt,
images/<id>.jpg}. An image of class c is 8 pixels high and 8 + c wide, every third one grayscale."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from moder.datasets import catalog


def write(root: Path, n_classes: int, per_class: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    data = root / "fgvc-aircraft-2013b" / "data"
    (data / "images").mkdir(parents=True, exist_ok=True)
    variants = catalog("aircraft").class_names
    (data / "variants.txt").write_text("".join(f"{variant}\n" for variant in variants))
    image_id = 1000000
    for split in ("train", "test"):
        lines = []
        for c in range(n_classes):
            for k in range(per_class):
                image_id += 1
                shape = (8, 8 + c) if k % 3 == 2 else (8, 8 + c, 3)
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(data / "images" / f"{image_id}.jpg")
                lines.append(f"{image_id} {variants[c]}\n")
        (data / f"images_variant_{split}.txt").write_text("".join(lines))
