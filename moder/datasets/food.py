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

from moder.datasets import DatasetFormatError, ImageSplit, Split, catalog, listed_items, remap_to_catalog, require

_HOW = "extract food-101.tar.gz (http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz) into the dataset root"


def load(root: Path, split: Split) -> ImageSplit:
    base = root / "food-101"
    meta = base / "meta" / f"{split}.json"
    require("food", [meta, base / "images"], _HOW)
    try:
        # loader=str: items come back as paths; ImageSplit decodes them later, as RGB.
        dataset = Food101(root, split=split, download=False, loader=str)
    except (ValueError, AttributeError, TypeError) as error:  # json errors and a non-{class: [ids]} layout
        raise DatasetFormatError(f"food: cannot read {meta}: {error}") from error
    names = catalog("food").class_names
    # torchvision numbers only the classes present in this json; the catalog numbers all 101.
    to_catalog = remap_to_catalog(
        dataset.classes,
        names,
        lambda unknown: f"food: {meta} names classes that Food-101 does not have: {', '.join(unknown)}",
        normalise=lambda folder: folder.replace("_", " "),
    )
    images, labels = listed_items(dataset, root, "food", f"listed in {meta}")
    return ImageSplit(images, [to_catalog[y] for y in labels], names)
