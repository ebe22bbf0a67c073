"""Dataset adapters of MTIL's food, mnist, pets and cars, Class-IL's imagenet-r and cub200, and the
generic imagefolder and csv sources, on tiny fixtures written in each dataset's real layout."""

import csv
import importlib
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from torchvision.transforms.functional import pil_to_tensor

from moder.datasets import ADAPTERS, DatasetFormatError, DatasetNotFound, catalog, load_split
from tests.layouts import imagenet_r as imagenet_r_layout
from tests.layouts.imagefolder import class_names as made_up_names

N_CLASSES, PER_CLASS = 3, 4
CATALOGUED = {"food": 101, "mnist": 10, "pets": 37, "cars": 196, "imagenet-r": 200, "cub200": 200}
SOURCES = [*CATALOGUED, "imagefolder", "csv"]


def write(source: str, root: Path, n_classes: int = N_CLASSES, per_class: int = PER_CLASS) -> Path:
    importlib.import_module(f"tests.layouts.{ADAPTERS[source]}").write(root, n_classes, per_class)
    return root


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict[str, Path]:
    """One untouched fixture per source, shared by the read-only tests."""
    return {source: write(source, tmp_path_factory.mktemp(source)) for source in SOURCES}


def _class_of_file(source: str, path: str) -> str | None:
    """The class name a fixture file was written for, where its path says it (None: mnist, cars, csv)."""
    if source in ("mnist", "cars", "csv"):
        return None
    file = Path(path)
    if source == "food":
        return file.parent.name.replace("_", " ")
    if source == "pets":
        return file.stem.rsplit("_", 1)[0].replace("_", " ")
    if source == "imagenet-r":
        wnids = imagenet_r_layout.wnids(200)
        return catalog("imagenet-r").class_names[wnids.index(file.parent.name)]
    if source == "cub200":
        return catalog("cub200").class_names[int(file.parent.name[:3]) - 1]
    return file.parent.name.replace("_", " ")  # imagefolder


@pytest.mark.parametrize("source", SOURCES)
def test_fixture_round_trips(source, fixtures):
    root = fixtures[source]
    train, test = load_split(source, root, "train"), load_split(source, root, "test")
    expected_names = catalog(source).class_names if source in CATALOGUED else made_up_names(N_CLASSES)
    for split in (train, test):
        assert split.class_names == expected_names
        assert set(split.labels) == set(range(N_CLASSES))
        image, label = split[0]
        assert image.mode == "RGB" and label == split.labels[0]
        for path, label in zip(split.images, split.labels, strict=True):
            name = _class_of_file(source, path)
            assert name is None or split.class_names[label] == name
        tensor, _ = split.with_transform(pil_to_tensor)[0]
        assert isinstance(tensor, torch.Tensor) and tensor.shape[0] == 3
    if source == "imagenet-r":  # one pool of PER_CLASS images per class, split by the adapter
        assert len(train) + len(test) == N_CLASSES * PER_CLASS and len(test) > 0
    else:
        assert Counter(train.labels) == Counter(test.labels) == {c: PER_CLASS for c in range(N_CLASSES)}


def test_csv_rows_keep_their_labels(fixtures):
    root = fixtures["csv"]
    split = load_split("csv", root, "test")
    with (root / "test.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert split.images == [str(root / row["path"]) for row in rows]
    assert [split.class_names[y] for y in split.labels] == [row["label"] for row in rows]


def test_mnist_labels_are_the_stored_digits(tmp_path):
    split = load_split("mnist", write("mnist", tmp_path, n_classes=10, per_class=2), "train")
    assert split.labels == [d for d in range(10) for _ in range(2)]
    assert split.class_names[split.labels[-1]] == "9"


def test_cars_labels_follow_the_annotation_classes(fixtures):
    split = load_split("cars", fixtures["cars"], "test")
    assert split.labels == [c for c in range(N_CLASSES) for _ in range(PER_CLASS)]
    assert [Path(p).parent.name for p in split.images] == ["cars_test"] * len(split)


def test_pets_train_is_trainval(fixtures):
    root = fixtures["pets"] / "oxford-iiit-pet"
    trainval = [line.split()[0] for line in (root / "annotations" / "trainval.txt").read_text().splitlines()]
    assert [Path(p).stem for p in load_split("pets", fixtures["pets"], "train").images] == trainval


def test_cub_split_follows_train_test_split_txt(fixtures):
    base = fixtures["cub200"] / "CUB_200_2011"
    flag = dict(line.split() for line in (base / "train_test_split.txt").read_text().splitlines())
    path_of = dict(line.split() for line in (base / "images.txt").read_text().splitlines())
    for split, wanted in (("train", "1"), ("test", "0")):
        expected = [str(base / "images" / path_of[i]) for i in sorted(path_of, key=int) if flag[i] == wanted]
        assert load_split("cub200", fixtures["cub200"], split).images == expected


def test_imagenet_r_split_is_deterministic_disjoint_and_covering(tmp_path):
    root = write("imagenet-r", tmp_path, n_classes=4, per_class=10)
    train, test = load_split("imagenet-r", root, "train"), load_split("imagenet-r", root, "test")
    assert load_split("imagenet-r", root, "train").images == train.images
    everything = {str(p) for p in (root / "imagenet-r").rglob("*.jpg")}
    assert not set(train.images) & set(test.images)
    assert set(train.images) | set(test.images) == everything
    assert (len(train), len(test)) == (32, 8)


def _mammoth_yaml(path: Path, entries: list[str]) -> None:
    # mammoth's file: `data:` paths as CODA-Prompt wrote them, `targets:` (not read by the adapter).
    lines = ["data:", *(f"- data/imagenet-r/{e}" for e in entries), "targets:", *("- 0" for _ in entries)]
    path.write_text("\n".join(lines) + "\n")


def test_imagenet_r_uses_mammoths_lists_when_present(tmp_path):
    root = write("imagenet-r", tmp_path, n_classes=2, per_class=3)
    wnids = imagenet_r_layout.wnids(2)
    files = sorted(f"{p.parent.name}/{p.name}" for p in (root / "imagenet-r").rglob("*.jpg"))
    _mammoth_yaml(root / "imagenet-r_train.yaml", files[:4])
    _mammoth_yaml(root / "imagenet-r_test.yaml", files[4:])
    train, test = load_split("imagenet-r", root, "train"), load_split("imagenet-r", root, "test")
    assert train.images == [str(root / "imagenet-r" / f) for f in files[:4]]
    assert test.labels == [wnids.index(f.split("/")[0]) for f in files[4:]]


def test_imagenet_r_mammoth_lists_come_in_pairs_and_name_existing_files(tmp_path):
    root = write("imagenet-r", tmp_path, n_classes=1, per_class=2)
    wnid = imagenet_r_layout.wnids(1)[0]
    _mammoth_yaml(root / "imagenet-r_train.yaml", [f"{wnid}/art_0.jpg"])
    with pytest.raises(DatasetNotFound, match="imagenet-r_test.yaml"):
        load_split("imagenet-r", root, "train")
    _mammoth_yaml(root / "imagenet-r_test.yaml", [f"{wnid}/gone_7.jpg"])
    with pytest.raises(DatasetNotFound, match="gone_7.jpg"):
        load_split("imagenet-r", root, "test")


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("split", ["train", "test"])
def test_empty_root_is_not_found_naming_what_was_looked_for(source, split, tmp_path):
    with pytest.raises(DatasetNotFound) as error:
        load_split(source, tmp_path, split)
    assert str(tmp_path) in str(error.value)


def test_missing_root_is_not_found(tmp_path):
    with pytest.raises(DatasetNotFound, match="nowhere"):
        load_split("food", tmp_path / "nowhere", "train")


# (source, split, file removed from a complete fixture)
MISSING = [
    ("food", "test", "food-101/meta/test.json"),
    ("food", "train", "food-101/images"),
    ("mnist", "test", "MNIST/raw/t10k-labels-idx1-ubyte"),
    ("pets", "train", "oxford-iiit-pet/annotations/trainval.txt"),
    ("cars", "train", "stanford_cars/devkit/cars_meta.mat"),
    ("cars", "test", "stanford_cars/cars_test_annos_withlabels.mat"),
    ("cub200", "train", "CUB_200_2011/train_test_split.txt"),
    ("imagefolder", "test", "test"),
    ("csv", "test", "test.csv"),
    ("csv", "train", "images/train_blue_circle_0.png"),
]


@pytest.mark.parametrize("source,split,relative", MISSING)
def test_missing_file_is_not_found_naming_its_path(source, split, relative, tmp_path):
    root = write(source, tmp_path)
    path = root / relative
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(DatasetNotFound) as error:
        load_split(source, root, split)
    assert str(path) in str(error.value)


# (source, split, file, content written over it, text the error must contain besides the file)
MALFORMED = [
    ("food", "train", "food-101/meta/train.json", "{not json", ""),
    ("food", "train", "food-101/meta/train.json", '{"pizza_pie": ["pizza_pie/1"]}', "pizza_pie"),
    ("mnist", "train", "MNIST/raw/train-images-idx3-ubyte", "not an idx file", ""),
    ("pets", "test", "oxford-iiit-pet/annotations/test.txt", "Abyssinian_1 1 1\n", ""),
    ("pets", "test", "oxford-iiit-pet/annotations/test.txt", "Abyssinian_1 38 1 1\n", "1-37"),
    ("cars", "train", "stanford_cars/devkit/cars_train_annos.mat", "not a mat file", ""),
    ("cub200", "train", "CUB_200_2011/image_class_labels.txt", "1 1\nbroken\n", "line 2"),
    ("imagenet-r", "train", "imagenet-r_train.yaml", "[not, a, mapping]", ""),
    ("csv", "train", "train.csv", "file,class\nimages/x.png,red circle\n", "line 1"),
    ("csv", "train", "train.csv", "path,label\nimages/x.png\n", "line 2"),
    ("csv", "test", "test.csv", "path,label\nimages/test_blue_circle_0.png,green ring\n", "'green ring'"),
]


@pytest.mark.parametrize("source,split,relative,content,detail", MALFORMED)
def test_malformed_file_is_a_format_error_naming_it(source, split, relative, content, detail, tmp_path):
    root = write(source, tmp_path)
    (root / relative).write_text(content)
    if relative == "imagenet-r_train.yaml":
        (root / "imagenet-r_test.yaml").write_text("data: []\n")
    with pytest.raises(DatasetFormatError) as error:
        load_split(source, root, split)
    assert str(root / relative) in str(error.value) and detail in str(error.value)


def test_cub_split_flag_must_be_0_or_1(tmp_path):
    root = write("cub200", tmp_path, n_classes=1, per_class=1)
    (root / "CUB_200_2011" / "train_test_split.txt").write_text("1 1\n2 yes\n")
    with pytest.raises(DatasetFormatError, match=r"train_test_split\.txt gives image 2 'yes'"):
        load_split("cub200", root, "test")


def test_unknown_imagenet_r_folder_is_a_format_error(tmp_path):
    root = write("imagenet-r", tmp_path, n_classes=1, per_class=2)
    (root / "imagenet-r" / "n99999999").mkdir()
    with pytest.raises(DatasetFormatError, match="n99999999"):
        load_split("imagenet-r", root, "train")


def test_imagefolder_refuses_a_test_class_missing_from_train(tmp_path):
    root = write("imagefolder", tmp_path)
    shutil.copytree(root / "test" / "blue_circle", root / "test" / "white_whale")
    with pytest.raises(DatasetFormatError, match="white_whale"):
        load_split("imagefolder", root, "test")


def test_imagefolder_names_classes_from_sorted_folders(tmp_path):
    root = write("imagefolder", tmp_path)
    shutil.copytree(root / "train" / "blue_circle", root / "train" / "aa_first")
    assert load_split("imagefolder", root, "train").class_names[:2] == ["aa first", "blue circle"]


def test_csv_classes_txt_fixes_order_and_names(tmp_path):
    root = write("csv", tmp_path)
    names = made_up_names(N_CLASSES)
    (root / "classes.txt").write_text("\n".join(reversed(names)) + "\n")
    split = load_split("csv", root, "test")
    assert split.class_names == list(reversed(names))
    assert {split.class_names[y] for y in split.labels} == set(names)


def test_csv_class_listed_without_rows_is_refused_naming_it(tmp_path):
    root = write("csv", tmp_path)
    (root / "classes.txt").write_text("\n".join(["unused class", *made_up_names(N_CLASSES)]) + "\n")
    with pytest.raises(DatasetFormatError, match=r"csv: .*train\.csv has no row of class\(es\) 'unused class'$"):
        load_split("csv", root, "train")


def test_csv_label_outside_classes_txt_is_refused_naming_the_line(tmp_path):
    root = write("csv", tmp_path)
    (root / "classes.txt").write_text("blue circle\nblue cross\n")  # blue diamond is missing
    with pytest.raises(DatasetFormatError, match=r"train\.csv line \d+: class 'blue diamond'"):
        load_split("csv", root, "train")


def test_csv_test_class_without_train_rows_is_refused(tmp_path):
    root = write("csv", tmp_path)
    names = made_up_names(N_CLASSES)
    (root / "classes.txt").write_text("\n".join([*names, "white whale"]) + "\n")
    with (root / "test.csv").open("a", newline="") as file:
        csv.writer(file).writerow(["images/test_blue_circle_0.png", "white whale"])
    with pytest.raises(DatasetFormatError, match="'white whale' has no rows in"):
        load_split("csv", root, "test")


@pytest.mark.parametrize("source,count", CATALOGUED.items())
def test_catalog_counts_and_templates(source, count):
    entry = catalog(source)
    assert len(entry.class_names) == len(set(entry.class_names)) == count
    assert entry.templates and all("{}" in t for t in entry.templates)
    data = json.loads(
        (Path(importlib.import_module("moder.datasets").__file__).parent / "catalog" / f"{source}.json").read_text()
    )
    assert data["source"]


def test_imagenet_r_catalog_wnids_are_sorted_and_match_the_names():
    wnids = imagenet_r_layout.wnids(200)
    assert wnids == sorted(wnids) and len(set(wnids)) == 200
    assert catalog("imagenet-r").class_names[:2] == ["goldfish", "great white shark"]
