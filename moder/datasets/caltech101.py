"""Caltech-101 (Fei-Fei et al., 2004): 101 object classes, MTIL's "Caltech101" task.

Layout under root (what torchvision's Caltech101 reads; only the images are needed):

    caltech101/101_ObjectCategories/<folder>/image_0001.jpg ... image_<n>.jpg
    caltech101/101_ObjectCategories/BACKGROUND_Google/...      (present in the download, not a class)

Official download: https://data.caltech.edu/records/mzrjq-6wc02 (DOI 10.22002/D1.20086). The Google
Drive links of torchvision <= 0.23 (`download=True`) are dead (pytorch/vision#9192), so by hand:

    unzip caltech-101.zip            # from the page above: caltech-101/101_ObjectCategories.tar.gz, ...
    mkdir -p <root>/caltech101
    tar xzf caltech-101/101_ObjectCategories.tar.gz -C <root>/caltech101

Classes as torchvision and ZSCL (mtil/src/datasets/collections.py, class Caltech101): the sorted
folder names without BACKGROUND_Google, so 101 classes starting Faces ("off-center face"),
Faces_easy ("centered face"), Leopards, Motorbikes, accordion, ...; CLIP's prompt list has a 102nd,
"background", which ZSCL (and this catalog) drop. There is no official test split: ZSCL splits the
8,677 images, in torchvision's order (folder by folder, image_0001 first), 80/20 at random with seed 42
(`random_split_indices`).
"""

from __future__ import annotations

import os
from pathlib import Path

from torchvision.datasets import Caltech101

from moder.datasets import (
    DatasetFormatError,
    DatasetNotFound,
    ImageSplit,
    Split,
    catalog,
    remap_to_catalog,
    under_root,
    zscl_split,
)

# The 101 class folders in label order (= sorted, as torchvision lists them); catalog names follow it.
FOLDERS: tuple[str, ...] = (
    "Faces",
    "Faces_easy",
    "Leopards",
    "Motorbikes",
    "accordion",
    "airplanes",
    "anchor",
    "ant",
    "barrel",
    "bass",
    "beaver",
    "binocular",
    "bonsai",
    "brain",
    "brontosaurus",
    "buddha",
    "butterfly",
    "camera",
    "cannon",
    "car_side",
    "ceiling_fan",
    "cellphone",
    "chair",
    "chandelier",
    "cougar_body",
    "cougar_face",
    "crab",
    "crayfish",
    "crocodile",
    "crocodile_head",
    "cup",
    "dalmatian",
    "dollar_bill",
    "dolphin",
    "dragonfly",
    "electric_guitar",
    "elephant",
    "emu",
    "euphonium",
    "ewer",
    "ferry",
    "flamingo",
    "flamingo_head",
    "garfield",
    "gerenuk",
    "gramophone",
    "grand_piano",
    "hawksbill",
    "headphone",
    "hedgehog",
    "helicopter",
    "ibis",
    "inline_skate",
    "joshua_tree",
    "kangaroo",
    "ketch",
    "lamp",
    "laptop",
    "llama",
    "lobster",
    "lotus",
    "mandolin",
    "mayfly",
    "menorah",
    "metronome",
    "minaret",
    "nautilus",
    "octopus",
    "okapi",
    "pagoda",
    "panda",
    "pigeon",
    "pizza",
    "platypus",
    "pyramid",
    "revolver",
    "rhino",
    "rooster",
    "saxophone",
    "schooner",
    "scissors",
    "scorpion",
    "sea_horse",
    "snoopy",
    "soccer_ball",
    "stapler",
    "starfish",
    "stegosaurus",
    "stop_sign",
    "strawberry",
    "sunflower",
    "tick",
    "trilobite",
    "umbrella",
    "watch",
    "water_lilly",
    "wheelchair",
    "wild_cat",
    "windsor_chair",
    "wrench",
    "yin_yang",
)
BACKGROUND = "BACKGROUND_Google"


def _check_folder(folder: Path) -> None:
    """torchvision indexes a folder's images as image_0001.jpg ... image_<number of entries>.jpg, so any
    other entry would make it point at a file that is not there."""
    entries = sorted(os.listdir(folder))
    expected = [f"image_{i:04d}.jpg" for i in range(1, len(entries) + 1)]
    stray = [entry for entry, want in zip(entries, expected, strict=True) if entry != want]
    if stray:
        raise DatasetFormatError(
            f"caltech101: unexpected {folder / stray[0]} (a class folder holds only "
            f"image_0001.jpg ... image_{len(entries):04d}.jpg)"
        )


def _images_and_labels(root: Path) -> tuple[list[Path], list[int]]:
    """Every image of the dataset with its label, in torchvision's order (the order ZSCL splits)."""
    images_dir = root / "caltech101" / "101_ObjectCategories"
    if not images_dir.is_dir():
        raise DatasetNotFound(
            f"caltech101: {images_dir} not found. Download caltech-101.zip from "
            f"https://data.caltech.edu/records/mzrjq-6wc02 and extract "
            f"101_ObjectCategories.tar.gz from it into {images_dir.parent} (see docs/datasets.md)."
        )
    if not (images_dir / BACKGROUND).is_dir():
        # torchvision removes this folder from the class list and fails when it is not there.
        raise DatasetFormatError(
            f"caltech101: {images_dir / BACKGROUND} is missing; {images_dir} should be "
            f"101_ObjectCategories.tar.gz extracted whole"
        )
    # torchvision's classes are this listing, sorted, without the background; checked before torchvision
    # walks each entry as a class folder, which fails on a stray file without naming it.
    categories = sorted(set(os.listdir(images_dir)) - {BACKGROUND})
    to_catalog = remap_to_catalog(
        categories, FOLDERS, lambda unknown: f"caltech101: {images_dir / unknown[0]} is not a Caltech-101 class folder"
    )
    dataset = Caltech101(root, target_type="category")
    for category in dataset.categories:
        _check_folder(images_dir / category)
    images = [
        under_root(root, images_dir / dataset.categories[y] / f"image_{i:04d}.jpg", "caltech101")
        for i, y in zip(dataset.index, dataset.y, strict=True)
    ]
    return images, [to_catalog[y] for y in dataset.y]


def load(root: Path, split: Split) -> ImageSplit:
    return zscl_split(ImageSplit(*_images_and_labels(Path(root)), catalog("caltech101").class_names), split)
