"""Fake CUB-200-2011: root/CUB_200_2011/images/<NNN.Name>/*.jpg, images.txt, image_class_labels.txt,
train_test_split.txt, classes.txt (per_class images per class in each split)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moder.datasets import catalog
from tests.layouts.imagefolder import save_image


def write(root: Path, n_classes: int, per_class: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    base = root / "CUB_200_2011"
    folders = [f"{c + 1:03d}.{name.replace(' ', '_')}" for c, name in enumerate(catalog("cub200").class_names)]
    images, labels, split = [], [], []
    for c in range(n_classes):
        for k in range(2 * per_class):  # train and test images of a class interleave, as in the real files
            image_id = len(images) + 1
            relative = f"{folders[c]}/{folders[c][4:]}_{k:04d}_{image_id}.jpg"
            save_image(base / "images" / relative, rng)
            images.append(f"{image_id} {relative}")
            labels.append(f"{image_id} {c + 1}")
            split.append(f"{image_id} {1 - k % 2}")
    for name, lines in (
        ("images.txt", images),
        ("image_class_labels.txt", labels),
        ("train_test_split.txt", split),
        ("classes.txt", [f"{c + 1} {folder}" for c, folder in enumerate(folders)]),
    ):
        (base / name).write_text("\n".join(lines) + "\n")
