"""Fake CIFAR-100, binary version: root/cifar-100-binary/{train.bin, test.bin, fine_label_names.txt}.
Records are coarse label, fine label, 3x1024 plane bytes; an image of class c has red value c at
its top-left pixel."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moder.datasets import catalog


def write(root: Path, n_classes: int, per_class: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    base = root / "cifar-100-binary"
    base.mkdir(parents=True, exist_ok=True)
    names = catalog("cifar100").class_names
    (base / "fine_label_names.txt").write_text("".join(f"{name.replace(' ', '_')}\n" for name in names))
    for split in ("train", "test"):
        records = rng.integers(0, 256, (n_classes * per_class, 2 + 3 * 32 * 32), dtype=np.uint8)
        fine = np.repeat(np.arange(n_classes, dtype=np.uint8), per_class)
        records[:, 0] = rng.integers(0, 20, len(records))  # coarse label, not read
        records[:, 1] = fine
        records[:, 2] = fine  # red plane starts with the top-left pixel
        records[rng.permutation(len(records))].tofile(base / f"{split}.bin")
