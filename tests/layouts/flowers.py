"""Fake Flowers-102: root/flowers-102/{jpg/image_<id>.jpg, imagelabels.mat, setid.mat}, per_class
images per class in each of trnid, valid and tstid, ids shuffled across classes. An image of class c
is 8 pixels high and 8 + c wide, every third one grayscale."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat


def write(root: Path, n_classes: int, per_class: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    base = root / "flowers-102"
    (base / "jpg").mkdir(parents=True, exist_ok=True)
    n = 3 * n_classes * per_class
    classes = np.repeat(np.arange(1, n_classes + 1), 3 * per_class)[rng.permutation(n)]  # class of image id i+1
    for i, c in enumerate((classes - 1).tolist()):
        shape = (8, 8 + c) if i % 3 == 2 else (8, 8 + c, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(base / "jpg" / f"image_{i + 1:05d}.jpg")
    # As in the real files: 1 x N row vectors.
    savemat(base / "imagelabels.mat", {"labels": classes[None, :].astype(np.uint8)})
    ids = {key: [] for key in ("trnid", "valid", "tstid")}
    for c in range(1, n_classes + 1):
        members = (np.flatnonzero(classes == c) + 1).tolist()
        for j, key in enumerate(ids):
            ids[key] += members[j * per_class : (j + 1) * per_class]
    savemat(base / "setid.mat", {key: np.array([sorted(value)], dtype=np.uint16) for key, value in ids.items()})
