"""Fake `csv` dataset: root/images/*.png listed by root/train.csv and root/test.csv (`path,label`)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from tests.layouts.imagefolder import class_names, save_image


def write(root: Path, n_classes: int, per_class: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        rows = []
        for name in class_names(n_classes):
            for k in range(per_class):
                relative = f"images/{split}_{name.replace(' ', '_')}_{k}.png"
                save_image(root / relative, rng)
                rows.append([relative, name])
        with (root / f"{split}.csv").open("w", newline="") as file:
            csv.writer(file).writerows([["path", "label"], *rows])
