"""Adapters of the MTIL datasets of ZSCL (ICCV 2023), group 1: aircraft, caltech101, cifar100, dtd,
eurosat, flowers, sun397, each on a tiny fixture written in the dataset's real on-disk layout.

Fixture images carry their class: 8 pixels high and 8 + class wide (CIFAR-100: red value of the
top-left pixel), so every item's label can be checked against the image it came with.
"""

from __future__ import annotations

import importlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import Caltech101, EuroSAT

from moder.datasets import DatasetFormatError, DatasetNotFound, ImageSplit, catalog, load_split, random_split_indices
from moder.datasets.caltech101 import FOLDERS as CALTECH_FOLDERS
from moder.datasets.eurosat import FOLDERS as EUROSAT_FOLDERS


def _width_class(image: Image.Image) -> int:
    return image.size[0] - 8


def _red_class(image: Image.Image) -> int:
    return image.getpixel((0, 0))[0]


def _append(path: Path, text: str) -> Path:
    path.write_text(path.read_text() + text)
    return path


def _truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[:-1])
    return path


def _junk(path: Path) -> Path:
    path.write_bytes(b"not a MATLAB file " * 8)
    return path


def _stray_file(path: Path) -> Path:
    path.write_text("not an image\n")
    return path


def _unknown_eurosat_folder(root: Path) -> Path:
    folder = root / "eurosat" / "2750" / "Clouds"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "Clouds_1.jpg")
    return folder


def _unlisted_sun397_folder(root: Path) -> Path:
    folder = root / "SUN397" / "z" / "zz_unlisted"
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "sun_unlisted.jpg")
    return root / "SUN397" / "ClassName.txt"


@dataclass(frozen=True)
class Case:
    n_catalog: int
    official_test: bool  # False: ZSCL's random 80/20 split of everything
    missing: str  # a file or folder the adapter needs, relative to root
    malform: Callable[[Path], Path]  # spoils a fixture file under root, returns what the error must name
    class_of: Callable[[Image.Image], int] = _width_class
    n_classes: int = 3


CASES: dict[str, Case] = {
    "aircraft": Case(
        100,
        True,
        "fgvc-aircraft-2013b/data/images_variant_test.txt",
        lambda root: _append(root / "fgvc-aircraft-2013b/data/images_variant_train.txt", "1999999\n"),
    ),
    "caltech101": Case(
        101,
        False,
        "caltech101/101_ObjectCategories",
        lambda root: _stray_file(root / "caltech101/101_ObjectCategories/Faces/notes.txt"),
    ),
    "cifar100": Case(
        100,
        True,
        "cifar-100-binary/test.bin",
        lambda root: _truncate(root / "cifar-100-binary/train.bin"),
        class_of=_red_class,
    ),
    "dtd": Case(
        47,
        True,
        "dtd/dtd/labels/test1.txt",
        lambda root: _append(root / "dtd/dtd/labels/train1.txt", "no-class-folder.jpg\n"),
    ),
    "eurosat": Case(10, False, "eurosat/2750", _unknown_eurosat_folder),
    "flowers": Case(102, True, "flowers-102/setid.mat", lambda root: _junk(root / "flowers-102/imagelabels.mat")),
    # 10 classes reach two-folder-deep ones (/a/apartment_building/outdoor, /a/apse/indoor).
    "sun397": Case(397, False, "SUN397/ClassName.txt", _unlisted_sun397_folder, n_classes=10),
}
PER_CLASS = 5


def _write(source: str, root: Path, n_classes: int, per_class: int = PER_CLASS) -> Path:
    importlib.import_module(f"tests.layouts.{source}").write(root, n_classes, per_class, seed=0)
    return root


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Callable[[str], Path]:
    """Root of each dataset's fixture, written once for the module (tests must not change it)."""
    roots: dict[str, Path] = {}

    def get(source: str) -> Path:
        if source not in roots:
            roots[source] = _write(source, tmp_path_factory.mktemp(source), CASES[source].n_classes)
        return roots[source]

    return get


@pytest.mark.parametrize("source", CASES)
def test_fixture_round_trips(source, written):
    case, root = CASES[source], written(source)
    train, test = load_split(source, root, "train"), load_split(source, root, "test")
    every_label = sorted(list(range(case.n_classes)) * PER_CLASS)
    if case.official_test:
        assert sorted(train.labels) == sorted(test.labels) == every_label
    else:
        n_items = len(every_label)
        assert (len(train), len(test)) == (int(0.8 * n_items), n_items - int(0.8 * n_items))
        assert sorted(train.labels + test.labels) == every_label
    for split in (train, test):
        assert split.class_names == catalog(source).class_names
        for i in range(len(split)):
            image, label = split[i]
            assert isinstance(image, Image.Image) and image.mode == "RGB"
            assert case.class_of(image) == label
        # The transform is applied to the decoded image, per item.
        assert split.with_transform(case.class_of)[0] == (split.labels[0], split.labels[0])


def test_random_split_indices_is_zscls_split():
    # ZSCL: random_split(dataset, [int(0.8 * n), n - int(0.8 * n)], torch.Generator().manual_seed(42)),
    # i.e. torch.randperm(n) under seed 42, first int(0.8 * n) for training.
    assert random_split_indices(10) == ([2, 6, 1, 8, 4, 5, 0, 9], [3, 7])
    for n in (5, 13, 8677):
        train, test = random_split_indices(n)
        permutation = torch.randperm(n, generator=torch.Generator().manual_seed(42)).tolist()
        assert (train, test) == (permutation[: int(0.8 * n)], permutation[int(0.8 * n) :])
        assert sorted(train + test) == list(range(n)) and random_split_indices(n) == (train, test)


def _caltech_zscl_order(root: Path) -> list[Path]:
    dataset = Caltech101(root)
    return [
        root / "caltech101" / "101_ObjectCategories" / dataset.categories[y] / f"image_{i:04d}.jpg"
        for i, y in zip(dataset.index, dataset.y, strict=True)
    ]


# The item order each split is drawn over: torchvision's for Caltech101 and EuroSAT (ZSCL's exactly);
# for SUN397 torchvision's is the file system's directory order, so the adapter sorts by path.
ZSCL_ORDER: dict[str, Callable[[Path], list]] = {
    "caltech101": _caltech_zscl_order,
    "eurosat": lambda root: [Path(path) for path, _ in EuroSAT(root).samples],
    "sun397": lambda root: sorted((root / "SUN397").rglob("sun_*.jpg")),
}


@pytest.mark.parametrize("source", ZSCL_ORDER)
def test_split_without_official_test_set_is_zscls(source, written):
    root = written(source)
    train, test = load_split(source, root, "train"), load_split(source, root, "test")
    again = load_split(source, root, "train")
    assert again.images == train.images and again.labels == train.labels
    order = ZSCL_ORDER[source](root)
    train_indices, test_indices = random_split_indices(len(order))
    assert [Path(p) for p in train.images] == [order[i] for i in train_indices]
    assert [Path(p) for p in test.images] == [order[i] for i in test_indices]
    assert not set(train.images) & set(test.images)
    # Every class image is in one of the two; Caltech101's background images in neither.
    written_images = {p for p in root.rglob("*.jpg") if "BACKGROUND_Google" not in p.parts}
    assert {Path(p) for p in train.images + test.images} == written_images


@pytest.mark.parametrize("source", CASES)
def test_missing_root_names_it(source, tmp_path):
    with pytest.raises(DatasetNotFound, match="absent"):
        load_split(source, tmp_path / "absent", "train")
    module = importlib.import_module(f"moder.datasets.{source}")
    with pytest.raises(DatasetNotFound) as error:
        module.load(tmp_path, "train")  # root exists, the dataset is not in it
    assert str(tmp_path) in str(error.value)


@pytest.mark.parametrize("source", CASES)
def test_missing_file_names_it(source, tmp_path):
    root = _write(source, tmp_path, n_classes=2, per_class=2)
    missing = root / CASES[source].missing
    if missing.is_dir():
        shutil.rmtree(missing)
    else:
        missing.unlink()
    with pytest.raises(DatasetNotFound) as error:
        load_split(source, root, "test")
    assert str(missing) in str(error.value)


@pytest.mark.parametrize("source", CASES)
def test_malformed_file_names_it(source, tmp_path):
    root = _write(source, tmp_path, n_classes=2, per_class=2)
    spoiled = CASES[source].malform(root)
    with pytest.raises(DatasetFormatError) as error:
        load_split(source, root, "train")
    assert str(spoiled) in str(error.value)


@pytest.mark.parametrize("source", CASES)
def test_catalog(source):
    entry = catalog(source)
    assert len(entry.class_names) == len(set(entry.class_names)) == CASES[source].n_catalog
    assert entry.templates and all("{}" in template for template in entry.templates)


def test_catalog_orders_follow_the_datasets_label_orders():
    # Folder-labelled datasets: torchvision numbers sorted folders; the catalog names must follow.
    assert list(CALTECH_FOLDERS) == sorted(CALTECH_FOLDERS) and len(CALTECH_FOLDERS) == 101
    caltech = dict(zip(CALTECH_FOLDERS, catalog("caltech101").class_names, strict=True))
    assert (caltech["Faces"], caltech["Faces_easy"], caltech["car_side"], caltech["yin_yang"]) == (
        "off-center face",
        "centered face",
        "side of a car",
        "yin and yang symbol",
    )
    assert "background" not in catalog("caltech101").class_names  # ZSCL drops BACKGROUND_Google
    assert list(EUROSAT_FOLDERS) == sorted(EUROSAT_FOLDERS)
    eurosat = dict(zip(EUROSAT_FOLDERS, catalog("eurosat").class_names, strict=True))
    assert (eurosat["AnnualCrop"], eurosat["HerbaceousVegetation"], eurosat["SeaLake"]) == (
        "annual crop land",
        "brushland or shrubland",
        "lake or sea",
    )
    # Name-labelled datasets: these label orders are sorted name lists.
    assert catalog("dtd").class_names == sorted(catalog("dtd").class_names)
    cifar = [name.replace(" ", "_") for name in catalog("cifar100").class_names]
    assert cifar == sorted(cifar)
    assert catalog("aircraft").class_names == sorted(catalog("aircraft").class_names)
    sun = catalog("sun397").class_names
    assert sun.index("jail indoor") < sun.index("jail cell")  # ClassName.txt: /j/jail/indoor, /j/jail_cell


def test_cifar100_items_are_decoded_from_the_records(written):
    split: ImageSplit = load_split("cifar100", written("cifar100"), "test")
    records = np.fromfile(written("cifar100") / "cifar-100-binary" / "test.bin", dtype=np.uint8).reshape(-1, 3074)
    pixels = np.asarray(split[0][0])
    assert pixels.shape == (32, 32, 3)
    assert (pixels[:, :, 1].ravel() == records[0, 2 + 1024 : 2 + 2048]).all()  # green plane, row-major
