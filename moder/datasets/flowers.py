"""Oxford Flowers-102 (Nilsback & Zisserman, 2008): 102 flower classes, MTIL's "Flowers" task.

Layout under root (torchvision's Flowers102 layout):

    flowers-102/jpg/image_00001.jpg ... image_08189.jpg
    flowers-102/imagelabels.mat       labels: class 1..102 of image i at position i-1
    flowers-102/setid.mat             trnid, valid, tstid: the image ids of each split

Official download, all three from https://www.robots.ox.ac.uk/~vgg/data/flowers/102/: 102flowers.tgz
(`tar xzf 102flowers.tgz -C <root>/flowers-102` gives jpg/), imagelabels.mat and setid.mat (into
<root>/flowers-102).

Read here, not with torchvision's Flowers102: that one checks the .mat files' md5 sums, which only the
original files pass. Splits as ZSCL's MTIL (mtil/src/datasets/collections.py, class Flowers): train =
trnid (1,020 images; valid not added), test = tstid (6,149 images). Label = class - 1, the index of
CLIP's name for it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.io import loadmat
from scipy.io.matlab import MatReadError

from moder.datasets import DatasetFormatError, DatasetNotFound, ImageSplit, Split, catalog, check_class_ids, under_root

_SPLIT_KEY = {"train": "trnid", "test": "tstid"}


def _read_mat_vector(path: Path, key: str) -> np.ndarray:
    if not path.is_file():
        raise DatasetNotFound(
            f"flowers: {path} not found. Download it from "
            f"https://www.robots.ox.ac.uk/~vgg/data/flowers/102/{path.name} into {path.parent} "
            f"(see docs/datasets.md)."
        )
    try:
        return np.asarray(loadmat(path)[key]).ravel().astype(np.int64)
    except (MatReadError, ValueError, KeyError, IndexError, TypeError) as error:  # loadmat's ways to fail on junk
        raise DatasetFormatError(
            f"flowers: {path} is not a MATLAB file with a numeric {key!r} array: {error!r}"
        ) from error


def load(root: Path, split: Split) -> ImageSplit:
    base = Path(root) / "flowers-102"
    images_dir = base / "jpg"
    if not images_dir.is_dir():
        raise DatasetNotFound(
            f"flowers: {images_dir} not found. Download "
            f"https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz and extract it "
            f"in {base} (see docs/datasets.md)."
        )
    classes = _read_mat_vector(base / "imagelabels.mat", "labels")
    ids = _read_mat_vector(base / "setid.mat", _SPLIT_KEY[split])
    names = catalog("flowers").class_names
    if ids.size and not (ids.min() >= 1 and ids.max() <= len(classes)):
        raise DatasetFormatError(f"flowers: {base / 'setid.mat'} has image ids outside 1..{len(classes)}")
    labels = (classes[ids - 1] - 1).tolist()
    check_class_ids(labels, len(names), "flowers", base / "imagelabels.mat")
    images = [under_root(root, images_dir / f"image_{i:05d}.jpg", "flowers") for i in ids.tolist()]
    return ImageSplit(images, labels, names)
