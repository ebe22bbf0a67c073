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

from moder.datasets import DatasetFormatError, ImageSplit, Split, catalog, listed_items, remap_to_catalog, require

_URL = "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz"


def load(root: Path, split: Split) -> ImageSplit:
    data = Path(root) / "fgvc-aircraft-2013b" / "data"
    variants, split_file = data / "variants.txt", data / f"images_variant_{split}.txt"
    require(
        "aircraft",
        [variants, split_file, data / "images"],
        f"download {_URL} and extract it in {root} (see docs/datasets.md)",
    )
    try:
        # loader=str: items come back as paths; ImageSplit decodes them later, as RGB.
        dataset = FGVCAircraft(root, split=split, annotation_level="variant", loader=str)
    except (ValueError, KeyError) as error:
        raise DatasetFormatError(
            f"aircraft: cannot parse {split_file} (lines '<image id> <variant from {variants.name}>'): {error!r}"
        ) from error
    names = catalog("aircraft").class_names
    to_catalog = remap_to_catalog(
        dataset.classes,
        names,
        lambda unknown: f"aircraft: {variants} lists {unknown[0]!r}, not an FGVC-Aircraft variant",
    )
    images, labels = listed_items(dataset, root, "aircraft", f"listed in {split_file}")
    return ImageSplit(images, [to_catalog[y] for y in labels], names)
