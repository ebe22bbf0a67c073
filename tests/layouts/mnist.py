"""Fake MNIST: root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte in the IDX format."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _idx(data: np.ndarray, ndim: int) -> bytes:
    """IDX bytes: magic (0, 0, unsigned-byte type 0x08, ndim), then each dimension as big-endian uint32."""
    header = bytes([0, 0, 0x08, ndim]) + b"".join(int(d).to_bytes(4, "big") for d in data.shape)
    return header + data.astype(np.uint8).tobytes()


def write(root: Path, n_classes: int, per_class: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        labels = np.repeat(np.arange(n_classes), per_class)
        images = rng.integers(0, 256, (len(labels), 28, 28))
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(images, 3))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(labels, 1))
