"""MNIST (MTIL task "mnist"): the official 60,000/10,000 train/test split, as RGB images.

Layout under root (torchvision's, what `torchvision.datasets.MNIST(root, download=True)` leaves):

    root/MNIST/raw/train-images-idx3-ubyte    root/MNIST/raw/train-labels-idx1-ubyte
    root/MNIST/raw/t10k-images-idx3-ubyte     root/MNIST/raw/t10k-labels-idx1-ubyte

Manual download: the four *-ubyte.gz files from https://ossci-datasets.s3.amazonaws.com/mnist/
(torchvision's mirror of http://yann.lecun.com/exdb/mnist/), `gunzip` them into root/MNIST/raw/.

The IDX files are read here rather than through torchvision's `MNIST`, which first looks for
(and would unpickle) a legacy root/MNIST/processed/*.pt cache. Images stay in memory as uint8
arrays (47 MB for train) and become RGB PIL images when read; labels are the digits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from moder.datasets import DatasetFormatError, DatasetNotFound, ImageSplit, Split, catalog

# IDX magic numbers: unsigned bytes, 3 dimensions (images) or 1 dimension (labels).
_IMAGES_MAGIC, _LABELS_MAGIC = 0x00000803, 0x00000801


def _read_idx(path: Path, magic: int) -> np.ndarray:
    if not path.is_file():
        raise DatasetNotFound(
            f"mnist: {path} not found; download and gunzip it from "
            f"https://ossci-datasets.s3.amazonaws.com/mnist/{path.name}.gz into {path.parent}"
        )
    data = path.read_bytes()
    ndim = magic & 0xFF
    header = 4 * (1 + ndim)
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        raise DatasetFormatError(f"mnist: {path} is not an IDX file of unsigned bytes with {ndim} dimension(s)")
    shape = tuple(int.from_bytes(data[4 * i : 4 * i + 4], "big") for i in range(1, ndim + 1))
    if len(data) - header != int(np.prod(shape)):
        raise DatasetFormatError(
            f"mnist: {path} holds {len(data) - header} bytes after its header, "
            f"not the {int(np.prod(shape))} its shape {shape} says"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _gray_to_rgb(digit: np.ndarray) -> Image.Image:
    """One stored 28x28 digit as an RGB image: CLIP's preprocess expects three channels (module-level
    so that DataLoader workers can pickle it)."""
    return Image.fromarray(digit).convert("RGB")


def load(root: Path, split: Split) -> ImageSplit:
    raw = root / "MNIST" / "raw"
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(raw / f"{prefix}-images-idx3-ubyte", _IMAGES_MAGIC)
    labels = _read_idx(raw / f"{prefix}-labels-idx1-ubyte", _LABELS_MAGIC)
    if len(images) != len(labels):
        raise DatasetFormatError(f"mnist: {raw} has {len(images)} {prefix} images but {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise DatasetFormatError(f"mnist: {raw}/{prefix}-labels-idx1-ubyte holds label {labels.max()}, not a digit")
    return ImageSplit(images, labels.tolist(), catalog("mnist").class_names, read=_gray_to_rgb)
