"""Fake EuroSAT RGB: root/eurosat/2750/<Class>/<Class>_<n>.jpg, per_class images per class in all.
An image of class c is 8 pixels high and 8 + c wide."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from moder.datasets.eurosat import FOLDERS


def write(root: Path, n_classes: int, per_class: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for c, folder in enumerate(FOLDERS[:n_classes]):
        (root / "eurosat" / "2750" / folder).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            image = Image.fromarray(rng.integers(0, 256, (8, 8 + c, 3), dtype=np.uint8))
            image.save(root / "eurosat" / "2750" / folder / f"{folder}_{k + 1}.jpg")
