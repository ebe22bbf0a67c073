"""CIFAR-100 (Krizhevsky, 2009): 60,000 32x32 images in 100 classes, MTIL's "CIFAR100" task.

Layout under root (the official *binary* version extracted in root):

    cifar-100-binary/train.bin, test.bin      records of 3,074 bytes: coarse label, fine label, then
                                              1,024 red, 1,024 green, 1,024 blue bytes (32x32, row-major)
    cifar-100-binary/fine_label_names.txt     one fine class name per line, in label order

Official download: https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz
(`tar xzf cifar-100-binary.tar.gz -C <root>`).

Read here, not with torchvision's CIFAR100: that one reads the Python version, which is pickled (and
this project does not unpickle files from disk); the binary version holds the same images, labels and
train/test split. Splits as ZSCL's MTIL (torchvision's train=True / train=False): train.bin (50,000)
and test.bin (10,000). Labels are the fine labels; the catalog is CLIP's names for fine_label_names.txt
(underscores as spaces).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from moder.datasets import DatasetFormatError, ImageSplit, Split, catalog, remap_to_catalog, require

_SIDE = 32
_RECORD = 2 + 3 * _SIDE * _SIDE
_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"


def _read_records(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(N, 32, 32, 3) uint8 images and N fine labels of a train.bin / test.bin."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % _RECORD:
        raise DatasetFormatError(
            f"cifar100: {path} holds {raw.size} bytes, not a whole number of {_RECORD}-byte records"
        )
    records = raw.reshape(-1, _RECORD)
    images = records[:, 2:].reshape(-1, 3, _SIDE, _SIDE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), records[:, 1].astype(np.int64)


def load(root: Path, split: Split) -> ImageSplit:
    base = Path(root) / "cifar-100-binary"
    names_file, records_file = base / "fine_label_names.txt", base / f"{split}.bin"
    require("cifar100", [names_file, records_file], f"download {_URL} and extract it in {root} (see docs/datasets.md)")
    names = catalog("cifar100").class_names
    # Each fine label reaches the catalog through the name the download itself gives it.
    fine_names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
    to_catalog = remap_to_catalog(
        fine_names,
        names,
        lambda unknown: f"cifar100: {names_file} lists {unknown[0]!r}, not a CIFAR-100 class",
        normalise=lambda name: name.replace("_", " "),
    )
    images, fine = _read_records(records_file)
    if fine.size and fine.max() >= len(to_catalog):
        raise DatasetFormatError(
            f"cifar100: {records_file} has fine label {fine.max()}, but {names_file} names {len(to_catalog)} classes"
        )
    # Images stay one uint8 array; Image.fromarray makes each (32, 32, 3) item an RGB image when read.
    return ImageSplit(images, [to_catalog[y] for y in fine.tolist()], names, read=Image.fromarray)
