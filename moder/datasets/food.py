"""Food-101 (MTIL task "food"): torchvision's `Food101`, official train/test split (750/250 per class).

Layout under root (what extracting the official archive into root gives):

    root/food-101/images/<class_folder>/<image_id>.jpg    e.g. images/apple_pie/1005649.jpg
    root/food-101/meta/train.json                          {"apple_pie": ["apple_pie/1005649", ...], ...}
    root/food-101/meta/test.json

Download: http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz (4.7 GB), then
`tar -xzf food-101.tar.gz -C root`; or torchvision.datasets.Food101(root, download=True) once.
Labels follow the catalog (CLIP's names: the folder names with "_" -> " ", in sorted folder order).
"""
from __future__ import annotations

from pathlib import Path

from torchvision.datasets import Food101

from moder.datasets import DatasetFormatError, DatasetNotFound, ImageSplit, Split, catalog, under_root

_HOW = "extract food-101.tar.gz (http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz) into the dataset root"


def load(root: Path, split: Split) -> ImageSplit:
    base = root / "food-101"
    meta = base / "meta" / f"{split}.json"
    for path in (meta, base / "images"):
        if not path.exists():
            raise DatasetNotFound(f"food: {path} not found; {_HOW}")
    try:
        # loader=str: items come back as paths; ImageSplit decodes them later, as RGB.
        dataset = Food101(root, split=split, download=False, loader=str)
    except (ValueError, AttributeError, TypeError) as error:  # json errors and a non-{class: [ids]} layout
        raise DatasetFormatError(f"food: cannot read {meta}: {error}") from error
    names = catalog("food").class_names
    index = {name: i for i, name in enumerate(names)}
    unknown = [folder for folder in dataset.classes if folder.replace("_", " ") not in index]
    if unknown:
        raise DatasetFormatError(f"food: {meta} names classes that Food-101 does not have: {', '.join(unknown)}")
    # torchvision numbers only the classes present in this json; the catalog numbers all 101.
    to_catalog = [index[folder.replace("_", " ")] for folder in dataset.classes]
    items = [dataset[i] for i in range(len(dataset))]
    images = [str(under_root(root, path, "food", f"listed in {meta}")) for path, _ in items]
    return ImageSplit(images, [to_catalog[y] for _, y in items], names)
