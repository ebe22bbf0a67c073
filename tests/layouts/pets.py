"""Fake Oxford-IIIT Pet: root/oxford-iiit-pet/images/<Breed>_<n>.jpg and annotations/{trainval,test}.txt."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moder.datasets import catalog
from tests.layouts.imagefolder import save_image


def write(root: Path, n_classes: int, per_class: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    base = root / "oxford-iiit-pet"
    names = catalog("pets").class_names
    # The dataset capitalises cat breeds only; breed id counts within the species, in class-id order.
    species = [1 if name[0].isupper() else 2 for name in names]
    breed_id = [species[: i + 1].count(species[i]) for i in range(len(names))]
    (base / "annotations").mkdir(parents=True, exist_ok=True)
    for offset, split in enumerate(("trainval", "test")):
        lines = []
        for c in range(n_classes):
            for k in range(per_class):
                image_id = f"{names[c].replace(' ', '_')}_{100 * offset + k + 1}"
                save_image(base / "images" / f"{image_id}.jpg", rng)
                lines.append(f"{image_id} {c + 1} {species[c]} {breed_id[c]}")
        (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
