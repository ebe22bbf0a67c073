"""FGVC-Aircraft (Maji et al., 2013) at the variant level: 100 classes, MTIL's "Aircraft" task.

Layout under root (the official archive extracted in root; what torchvision's FGVCAircraft reads):

    fgvc-aircraft-2013b/data/variants.txt                     one variant name per line (label order)
    fgvc-aircraft-2013b/data/images_variant_train.txt         "<image id> <variant>" per line
    fgvc-aircraft-2013b/data/images_variant_test.txt
    fgvc-aircraft-2013b/data/images/<image id>.jpg

Official download: https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz
(`tar xzf fgvc-aircraft-2013b.tar.gz -C <root>`).

Splits as ZSCL's MTIL (mtil/src/datasets/collections.py, class Aircraft): train is the official
"train" list (3,334 images; not trainval), test the official "test" list (3,333 images).
"""
from __future__ import annotations

from pathlib import Path

from torchvision.datasets import FGVCAircraft

from moder.datasets import DatasetFormatError, DatasetNotFound, ImageSplit, Split, catalog, under_root

_URL = "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz"


def load(root: Path, split: Split) -> ImageSplit:
    data = Path(root) / "fgvc-aircraft-2013b" / "data"
    variants, split_file = data / "variants.txt", data / f"images_variant_{split}.txt"
    for path in (variants, split_file, data / "images"):
        if not path.exists():
            raise DatasetNotFound(f"aircraft: {path} not found. Download {_URL} and extract it in {root} "
                                  f"(see docs/datasets.md).")
    try:
        # loader=str: items come back as paths; ImageSplit decodes them later, as RGB.
        dataset = FGVCAircraft(root, split=split, annotation_level="variant", loader=str)
    except (ValueError, KeyError) as error:
        raise DatasetFormatError(f"aircraft: cannot parse {split_file} (lines '<image id> <variant from "
                                 f"{variants.name}>'): {error!r}") from error
    names = catalog("aircraft").class_names
    unknown = [variant for variant in dataset.classes if variant not in names]
    if unknown:
        raise DatasetFormatError(f"aircraft: {variants} lists {unknown[0]!r}, not an FGVC-Aircraft variant")
    to_catalog = [names.index(variant) for variant in dataset.classes]
    items = [dataset[i] for i in range(len(dataset))]
    images = [str(under_root(root, path, "aircraft", f"listed in {split_file}")) for path, _ in items]
    return ImageSplit(images, [to_catalog[y] for _, y in items], names)
