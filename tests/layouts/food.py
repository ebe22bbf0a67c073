"""Fake Food-101: root/food-101/images/<class_folder>/<id>.jpg and meta/{train,test}.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moder.datasets import catalog
from tests.layouts.imagefolder import save_image


def write(root: Path, n_classes: int, per_class: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    base = root / "food-101"
    folders = [name.replace(" ", "_") for name in catalog("food").class_names[:n_classes]]
    for offset, split in enumerate(("train", "test")):
        meta = {}
        for folder in folders:
            ids = [f"{folder}/{100000 * (offset + 1) + k}" for k in range(per_class)]
            for image_id in ids:
                save_image(base / "images" / f"{image_id}.jpg", rng)
            meta[folder] = ids
        (base / "meta").mkdir(parents=True, exist_ok=True)
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta))
