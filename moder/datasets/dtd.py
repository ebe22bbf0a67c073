"""Describable Textures Dataset (Cimpoi et al., 2014): 47 texture classes, MTIL's "DTD" task.

Layout under root (what torchvision's DTD reads: the official archive extracted in <root>/dtd):

    dtd/dtd/images/<class>/<class>_<n>.jpg
    dtd/dtd/labels/train1.txt, test1.txt        "<class>/<file>.jpg" per line

Official download: https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz
(`mkdir -p <root>/dtd && tar xzf dtd-r1.0.1.tar.gz -C <root>/dtd`).

Splits as ZSCL's MTIL (mtil/src/datasets/collections.py, class DTD): partition 1 of the ten official
ones, train = train1.txt (1,880 images; val1 not added), test = test1.txt (1,880 images). Class names
are the folder names, which are CLIP's names.
"""

from __future__ import annotations

from pathlib import Path

from torchvision.datasets import DTD

from moder.datasets import DatasetFormatError, ImageSplit, Split, catalog, listed_items, remap_to_catalog, require

_PARTITION = 1


def load(root: Path, split: Split) -> ImageSplit:
    data = Path(root) / "dtd" / "dtd"
    split_file = data / "labels" / f"{split}{_PARTITION}.txt"
    require(
        "dtd",
        [split_file, data / "images"],
        f"download https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz and extract it in "
        f"{data.parent} (see docs/datasets.md)",
    )
    try:
        # loader=str: items come back as paths; ImageSplit decodes them later, as RGB.
        dataset = DTD(root, split=split, partition=_PARTITION, loader=str)
    except ValueError as error:
        raise DatasetFormatError(f"dtd: cannot parse {split_file} (lines '<class>/<file>.jpg'): {error!r}") from error
    names = catalog("dtd").class_names
    # torchvision numbers only the classes that occur in the split file; the catalog numbers all 47.
    to_catalog = remap_to_catalog(
        dataset.classes, names, lambda unknown: f"dtd: {split_file} names class {unknown[0]!r}, not a DTD texture"
    )
    images, labels = listed_items(dataset, root, "dtd", f"listed in {split_file}")
    return ImageSplit(images, [to_catalog[y] for y in labels], names)
