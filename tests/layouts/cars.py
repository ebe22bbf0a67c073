"""Fake Stanford Cars in torchvision's layout: root/stanford_cars/{devkit,cars_train,cars_test}/ and the
.mat annotations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.io import savemat

from moder.datasets import catalog
from tests.layouts.imagefolder import save_image

_FIELDS = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]


def _annotations(path: Path, rows: list[tuple[int, str]]) -> None:
    """A MATLAB struct array `annotations` with the devkit's fields, one element per (class id, file name)."""
    records = np.array([(0, 0, 7, 7, cls, fname) for cls, fname in rows], dtype=[(f, object) for f in _FIELDS])
    savemat(path, {"annotations": records})


def write(root: Path, n_classes: int, per_class: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True, exist_ok=True)
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array(catalog("cars").class_names, dtype=object)})
    for split, annotations_file in (
        ("train", base / "devkit" / "cars_train_annos.mat"),
        ("test", base / "cars_test_annos_withlabels.mat"),
    ):
        rows = [(c + 1, f"{c * per_class + k + 1:05d}.jpg") for c in range(n_classes) for k in range(per_class)]
        for _, fname in rows:
            save_image(base / f"cars_{split}" / fname, rng)
        _annotations(annotations_file, rows)
