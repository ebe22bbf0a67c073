"""EuroSAT RGB (Helber et al., 2019): 27,000 Sentinel-2 tiles in 10 land-use classes, MTIL's "EuroSAT" task.

Layout under root (what torchvision's EuroSAT reads):

    eurosat/2750/<Class>/<Class>_<n>.jpg     Class in AnnualCrop, Forest, HerbaceousVegetation, Highway,
                                             Industrial, Pasture, PermanentCrop, Residential, River, SeaLake

Official download: EuroSAT.zip (RGB), https://github.com/phelber/EuroSAT; torchvision fetches the same
archive from https://huggingface.co/datasets/torchgeo/eurosat/resolve/main/EuroSAT.zip. Extract it in
<root>/eurosat (it holds the folder 2750), or run `torchvision.datasets.EuroSAT(<root>, download=True)` once.

Classes in sorted folder order (torchvision's ImageFolder order, and ZSCL's): CLIP's names for them,
e.g. HerbaceousVegetation is "brushland or shrubland". There is no official test split: ZSCL
(mtil/src/datasets/collections.py, class EuroSAT) splits all images, in ImageFolder order (sorted
classes, sorted file names), 80/20 at random with seed 42 (`random_split_indices`).
"""

from __future__ import annotations

from pathlib import Path

from torchvision.datasets import EuroSAT

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

# Class folders in label order (= sorted, ImageFolder's order); the catalog names follow it.
FOLDERS: tuple[str, ...] = (
    "AnnualCrop",
    "Forest",
    "HerbaceousVegetation",
    "Highway",
    "Industrial",
    "Pasture",
    "PermanentCrop",
    "Residential",
    "River",
    "SeaLake",
)


def _images_and_labels(root: Path) -> tuple[list[str], list[int]]:
    """Every image of the dataset with its label, in ImageFolder's order (the order ZSCL splits)."""
    data = root / "eurosat" / "2750"
    if not data.is_dir():
        raise DatasetNotFound(
            f"eurosat: {data} not found. Extract the RGB EuroSAT.zip (it holds 2750/) in "
            f"{data.parent}, or run torchvision.datasets.EuroSAT({str(root)!r}, download=True) "
            f"(see docs/datasets.md)."
        )
    try:
        dataset = EuroSAT(root)
    except FileNotFoundError as error:  # ImageFolder: no class folder, or a class folder without images
        raise DatasetFormatError(f"eurosat: {data}: {error}") from error
    to_catalog = remap_to_catalog(
        dataset.classes, FOLDERS, lambda unknown: f"eurosat: {data / unknown[0]} is not a EuroSAT class folder"
    )
    return (
        [str(under_root(root, path, "eurosat")) for path, _ in dataset.samples],
        [to_catalog[y] for _, y in dataset.samples],
    )


def load(root: Path, split: Split) -> ImageSplit:
    return zscl_split(ImageSplit(*_images_and_labels(Path(root)), catalog("eurosat").class_names), split)
