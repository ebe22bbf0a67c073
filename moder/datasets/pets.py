"""Oxford-IIIT Pet (MTIL task "pets"): torchvision's `OxfordIIITPet`, trainval (3,680) for "train"
and test (3,669) for "test", as in ZSCL.

Layout under root (torchvision's; the two official archives extracted into root/oxford-iiit-pet):

    root/oxford-iiit-pet/images/<Breed_name>_<n>.jpg        e.g. images/Abyssinian_1.jpg
    root/oxford-iiit-pet/annotations/trainval.txt           "<image id> <class id 1-37> <species> <breed id>" per line
    root/oxford-iiit-pet/annotations/test.txt

Download: https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz and
https://www.robots.ox.ac.uk/~vgg/data/pets/data/annotations.tar.gz, both extracted into
root/oxford-iiit-pet; or torchvision.datasets.OxfordIIITPet(root, download=True) once.
Label = class id - 1, the order of the catalog (CLIP's names, in class-id order).
"""

from __future__ import annotations

from pathlib import Path

from torchvision.datasets import OxfordIIITPet

from moder.datasets import DatasetFormatError, ImageSplit, Split, catalog, check_class_ids, require, under_root

_HOW = (
    "extract images.tar.gz and annotations.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/pets/ "
    "into <root>/oxford-iiit-pet"
)


def load(root: Path, split: Split) -> ImageSplit:
    base = root / "oxford-iiit-pet"
    annotations = base / "annotations" / ("trainval.txt" if split == "train" else "test.txt")
    require("pets", [annotations, base / "images"], _HOW)
    try:
        dataset = OxfordIIITPet(root, split="trainval" if split == "train" else "test", download=False)
    except ValueError as error:  # a line that is not four fields, or a non-integer id
        raise DatasetFormatError(f"pets: cannot read {annotations}: {error}") from error
    names = catalog("pets").class_names
    # OxfordIIITPet has no loader argument (it always opens the image): with torchvision pinned, take its
    # private file list and labels rather than decode every image here.
    labels = dataset._labels
    check_class_ids(labels, len(names), "pets", annotations)
    images = [str(under_root(root, path, "pets", f"listed in {annotations}")) for path in dataset._images]
    return ImageSplit(images, labels, names)
