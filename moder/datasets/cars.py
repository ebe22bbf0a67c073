"""Stanford Cars (MTIL task "cars"): torchvision's `StanfordCars`, official train/test split
(8,144/8,041 images, 196 classes).

Layout under root (torchvision's):

    root/stanford_cars/devkit/cars_meta.mat                class names, in class-id order
    root/stanford_cars/devkit/cars_train_annos.mat         train annotations (fname, class 1-196)
    root/stanford_cars/cars_test_annos_withlabels.mat      test annotations, with labels
    root/stanford_cars/cars_train/00001.jpg ...
    root/stanford_cars/cars_test/00001.jpg ...

Manual download (the official site, https://ai.stanford.edu/~jkrause/cars/car_dataset.html, is gone
and torchvision's download=True refuses), following https://github.com/pytorch/vision/issues/7545:
  1. images: the Kaggle mirror https://www.kaggle.com/datasets/jessicali9530/stanford-cars-dataset;
     extract cars_train/ and cars_test/ into root/stanford_cars and undo the archive's extra nesting
     (cars_train/cars_train/*.jpg -> cars_train/*.jpg, the same for cars_test);
  2. devkit: https://github.com/pytorch/vision/files/11644847/car_devkit.tgz, extracted into
     root/stanford_cars (gives devkit/cars_meta.mat and devkit/cars_train_annos.mat);
  3. test labels: cars_test_annos_withlabels.mat (linked from the issue's comment
     https://github.com/pytorch/vision/issues/7545#issuecomment-1631441616, also on Kaggle as
     https://www.kaggle.com/datasets/meaninglesslives/cars-devkit), into root/stanford_cars.
Label = annotation class - 1, the cars_meta.mat order (CLIP's class names are in that order).
"""

from __future__ import annotations

from pathlib import Path

from scipy.io.matlab import MatReadError
from torchvision.datasets import StanfordCars

from moder.datasets import DatasetFormatError, ImageSplit, Split, catalog, check_class_ids, listed_items, require

_HOW = (
    "the official download is gone: see the docstring of moder/datasets/cars.py for the manual download "
    "(Kaggle image mirror, devkit from https://github.com/pytorch/vision/issues/7545) and the layout"
)


def load(root: Path, split: Split) -> ImageSplit:
    base = root / "stanford_cars"
    meta = base / "devkit" / "cars_meta.mat"
    if split == "train":
        annotations, images_dir = base / "devkit" / "cars_train_annos.mat", base / "cars_train"
    else:
        annotations, images_dir = base / "cars_test_annos_withlabels.mat", base / "cars_test"
    require("cars", [meta, annotations, images_dir], _HOW)
    try:
        # loader=str: items come back as paths; ImageSplit decodes them later, as RGB.
        dataset = StanfordCars(root, split=split, download=False, loader=str)
    except (MatReadError, ValueError, KeyError, TypeError, IndexError) as error:
        # scipy's unreadable-file errors, or a .mat without the annotations/class_names fields torchvision reads.
        raise DatasetFormatError(f"cars: torchvision cannot read {annotations} or {meta}: {error!r}") from error
    names = catalog("cars").class_names
    images, labels = listed_items(dataset, root, "cars", f"listed in {annotations}")
    check_class_ids(labels, len(names), "cars", annotations)
    return ImageSplit(images, labels, names)
