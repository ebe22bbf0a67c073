"""Untrusted dataset inputs: file names that leave the dataset root (`..`, absolute paths, symlinks),
empty splits, and images that cannot be decoded, refused (or, for images, skipped on request) with
one line naming the file at fault."""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from moder.clip import save_backbone
from moder.datasets import BadImage, DatasetFormatError, load_split
from moder.params import parse_params
from stages.extract import image_splits
from stages.extract import main as extract_main
from tests.conftest import MINI
from tests.layouts import csv_list, cub200, eurosat, imagefolder, pets

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _outside(tmp_path: Path) -> Path:
    """An image beside the dataset root, not in it."""
    secret = tmp_path / "outside" / "secret.png"
    imagefolder.save_image(secret, np.random.default_rng(1))
    return secret


def _csv_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    csv_list.write(root, n_classes=2, per_class=1)
    return root


def _append_row(csv_file: Path, path: str) -> int:
    """Adds the row `path,<a train class>`; returns its line number."""
    with csv_file.open("a", newline="") as file:
        csv.writer(file).writerow([path, imagefolder.class_names(1)[0]])
    return len(csv_file.read_text().splitlines())


@pytest.mark.parametrize("row", ["../../etc/passwd", "images/../../outside/secret.png"])
def test_csv_row_leaving_the_root_is_refused_naming_the_line(row, tmp_path):
    _outside(tmp_path)
    root = _csv_root(tmp_path)
    line = _append_row(root / "train.csv", row)
    with pytest.raises(DatasetFormatError, match="outside the dataset root") as error:
        load_split("csv", root, "train")
    assert f"{root / 'train.csv'} line {line}" in str(error.value) and row in str(error.value)


@pytest.mark.parametrize("inside", [False, True])
def test_csv_absolute_path_is_refused_naming_the_line(inside, tmp_path):
    root = _csv_root(tmp_path)
    absolute = next((root / "images").iterdir()) if inside else _outside(tmp_path)
    line = _append_row(root / "test.csv", str(absolute))
    with pytest.raises(DatasetFormatError, match="is an absolute path") as error:
        load_split("csv", root, "test")
    assert f"{root / 'test.csv'} line {line}" in str(error.value) and str(absolute) in str(error.value)


def test_csv_path_through_a_symlink_out_of_the_root_is_refused(tmp_path):
    _outside(tmp_path)
    root = _csv_root(tmp_path)
    (root / "linked").symlink_to(tmp_path / "outside", target_is_directory=True)
    line = _append_row(root / "train.csv", "linked/secret.png")
    with pytest.raises(DatasetFormatError, match=f"train.csv line {line}") as error:
        load_split("csv", root, "train")
    assert str(root / "linked" / "secret.png") in str(error.value)


def test_csv_path_through_a_symlink_within_the_root_is_accepted(tmp_path):
    root = _csv_root(tmp_path)
    (root / "alias").symlink_to(root / "images", target_is_directory=True)
    first = next((root / "images").iterdir()).name
    _append_row(root / "train.csv", f"alias/{first}")
    assert load_split("csv", root, "train").images[-1] == str(root / "alias" / first)


def test_csv_with_only_a_header_is_refused_naming_it(tmp_path):
    root = _csv_root(tmp_path)
    (root / "train.csv").write_text("path,label\n")
    with pytest.raises(DatasetFormatError, match="has no rows") as error:
        load_split("csv", root, "train")
    assert str(root / "train.csv") in str(error.value)


def _imagefolder_root(tmp_path: Path, suffix: str = ".png") -> Path:
    root = tmp_path / "data"
    imagefolder.write(root, n_classes=2, per_class=2, suffix=suffix)
    return root


# (workers, decode): the workers decode with PIL, or read JPEG files for the device (the CPU here) to decode;
# with decode on the device the clean images are JPEG files, so that the device's decoder meets them.
DECODERS = [(0, "workers"), (2, "workers"), (0, "device"), (2, "device")]


def test_imagefolder_class_folder_symlinked_out_of_the_root_is_refused_naming_it(tmp_path):
    _outside(tmp_path)
    root = _imagefolder_root(tmp_path)
    (root / "train" / "zz_linked").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(DatasetFormatError, match="outside the dataset root") as error:
        load_split("imagefolder", root, "train")
    assert str(root / "train" / "zz_linked") in str(error.value)


def test_imagefolder_image_symlinked_out_of_the_root_is_refused_naming_it(tmp_path):
    secret = _outside(tmp_path)
    root = _imagefolder_root(tmp_path)
    link = root / "test" / "blue_circle" / "linked.png"
    link.symlink_to(secret)
    with pytest.raises(DatasetFormatError, match=f"resolves to {secret}") as error:
        load_split("imagefolder", root, "test")
    assert str(link) in str(error.value)


def test_imagefolder_symlinks_within_the_root_are_accepted(tmp_path):
    root = _imagefolder_root(tmp_path)
    (root / "train" / "blue_circle" / "alias.png").symlink_to(root / "test" / "blue_circle" / "0.png")
    (root / "spare").mkdir()
    shutil.copytree(root / "train" / "blue_cross", root / "spare" / "blue_cross")
    shutil.rmtree(root / "train" / "blue_cross")
    (root / "train" / "blue_cross").symlink_to(root / "spare" / "blue_cross", target_is_directory=True)
    split = load_split("imagefolder", root, "train")
    assert str(root / "train" / "blue_circle" / "alias.png") in split.images
    assert split.labels.count(1) == 2 and split[0][0].mode == "RGB"


def test_imagefolder_root_may_itself_be_a_symlink(tmp_path):
    root = _imagefolder_root(tmp_path)
    (tmp_path / "alias").symlink_to(root, target_is_directory=True)
    assert len(load_split("imagefolder", tmp_path / "alias", "train")) == 4


def test_imagefolder_empty_train_class_folder_is_refused_naming_it(tmp_path):
    root = _imagefolder_root(tmp_path)
    (root / "train" / "empty_class").mkdir()
    (root / "train" / "empty_class" / "notes.txt").write_text("not an image\n")
    with pytest.raises(DatasetFormatError, match="has no images") as error:
        load_split("imagefolder", root, "train")
    assert str(root / "train" / "empty_class") in str(error.value)


def test_a_class_without_test_images_is_refused_naming_its_folder(tmp_path):
    """A class never tested would count for nothing; one with no test folder at all, the same."""
    root = _imagefolder_root(tmp_path)
    first, second = sorted((root / "test").iterdir())[:2]
    for image in first.iterdir():
        image.unlink()
    with pytest.raises(DatasetFormatError, match=rf"class folder {first} has no images"):
        load_split("imagefolder", root, "test")
    shutil.rmtree(first)
    with pytest.raises(DatasetFormatError, match=rf"class folder {first} has no images"):
        load_split("imagefolder", root, "test")
    assert second.is_dir()


def test_a_listed_class_without_rows_is_refused_naming_it(tmp_path):
    root = _csv_root(tmp_path)
    names = sorted({row["label"] for row in csv.DictReader((root / "train.csv").open())})
    (root / "classes.txt").write_text("\n".join([*names, "violet moon"]) + "\n")
    with pytest.raises(DatasetFormatError, match=r"train.csv has no row of class\(es\) 'violet moon'"):
        load_split("csv", root, "train")


def test_imagefolder_split_without_images_is_refused_naming_it(tmp_path):
    root = _imagefolder_root(tmp_path)
    for folder in (root / "test").iterdir():
        shutil.rmtree(folder)
        folder.mkdir()
    with pytest.raises(DatasetFormatError, match="has no images") as error:
        load_split("imagefolder", root, "test")
    assert str(root / "test") in str(error.value)


def test_cub200_images_txt_entry_leaving_the_root_is_refused(tmp_path):
    _outside(tmp_path)
    root = tmp_path / "data"
    cub200.write(root, n_classes=1, per_class=2)
    images_txt = root / "CUB_200_2011" / "images.txt"
    _, rest = images_txt.read_text().split("\n", 1)
    images_txt.write_text(f"1 ../../../outside/secret.png\n{rest}")  # image 1 is a train image
    with pytest.raises(DatasetFormatError, match="outside the dataset root") as error:
        load_split("cub200", root, "train")
    assert f"image 1 of {images_txt}" in str(error.value)


def test_pets_absolute_image_id_is_refused_naming_the_list(tmp_path):
    root = tmp_path / "data"
    pets.write(root, n_classes=1, per_class=2)
    annotations = root / "oxford-iiit-pet" / "annotations" / "test.txt"
    annotations.write_text(annotations.read_text().replace("Abyssinian_", f"{tmp_path}/Abyssinian_", 1))
    with pytest.raises(DatasetFormatError, match="is an absolute path") as error:
        load_split("pets", root, "test")
    assert str(annotations) in str(error.value) and str(tmp_path / "Abyssinian_") in str(error.value)


def test_eurosat_image_symlinked_out_of_the_root_is_refused_naming_it(tmp_path):
    secret = _outside(tmp_path)
    root = tmp_path / "data"
    eurosat.write(root, n_classes=2, per_class=2)
    link = root / "eurosat" / "2750" / "Forest" / "Forest_9.jpg"
    link.symlink_to(secret)
    with pytest.raises(DatasetFormatError, match="outside the dataset root") as error:
        load_split("eurosat", root, "train")
    assert str(link) in str(error.value)


def _truncated_jpeg(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def test_reading_a_truncated_or_garbage_image_names_the_file(tmp_path):
    root = _imagefolder_root(tmp_path)
    truncated = _truncated_jpeg(root / "train" / "blue_circle" / "9.jpg")
    garbage = root / "train" / "blue_cross" / "9.png"
    garbage.write_bytes(b"not an image at all")
    split = load_split("imagefolder", root, "train")
    for bad in (truncated, garbage):
        with pytest.raises(BadImage, match=f"cannot decode image {bad}") as error:
            split[split.images.index(str(bad))]
        assert "\n" not in str(error.value)


def _params(root: Path, **extract) -> object:
    data = MINI | {
        "datasets": {"shapes": {"source": "imagefolder", "root": str(root)}},
        "tasks": {"shapes": {"dataset": "shapes"}},
    }
    return parse_params(data | {"extract": {**MINI["extract"], "batch_size": 3, **extract}})


@pytest.mark.parametrize(("workers", "decode"), DECODERS)
def test_bad_image_fails_extraction_with_one_line_naming_it(workers, decode, clip, tmp_path):
    root = _imagefolder_root(tmp_path, ".jpg" if decode == "device" else ".png")
    truncated = _truncated_jpeg(root / "test" / "blue_cross" / "1b.jpg")
    params = _params(root, workers=workers, decode=decode)
    with pytest.raises(BadImage, match=f"cannot decode image {truncated}") as error:
        image_splits(params, "shapes", clip)
    assert "\n" not in str(error.value) and "skip_bad_images" in str(error.value)


@pytest.mark.parametrize(("workers", "decode"), DECODERS)
def test_skip_bad_images_keeps_features_and_labels_aligned_and_says_so(workers, decode, clip, tmp_path, capsys):
    root = _imagefolder_root(tmp_path, ".jpg" if decode == "device" else ".png")
    names, clean, _ = image_splits(_params(root, decode=decode), "shapes", clip)
    # One bad image in the middle of a batch (batch_size 3), one alone at the end.
    bad = [_truncated_jpeg(root / "train" / "blue_circle" / "0b.jpg"), root / "train" / "blue_cross" / "9.png"]
    bad[1].write_bytes(b"not an image at all")
    params = _params(root, workers=workers, decode=decode, skip_bad_images=True)
    capsys.readouterr()
    skipped_names, skipping, _ = image_splits(params, "shapes", clip)
    assert skipped_names == names
    for split in ("train", "test"):
        features, labels = skipping[split]
        assert torch.equal(labels, clean[split][1]) and torch.allclose(features, clean[split][0], atol=1e-6)
    out = capsys.readouterr().out
    assert f"skipped 2 undecodable image(s) of the train split of {root}: {bad[0]}, {bad[1]}" in out
    assert "of the test split" not in out


def test_split_of_nothing_but_bad_images_is_refused(clip, tmp_path):
    root = _imagefolder_root(tmp_path)
    for image in (root / "test").rglob("*.png"):
        image.write_bytes(b"garbage")
    params = _params(root, skip_bad_images=True)
    with pytest.raises(DatasetFormatError, match=f"none of the 4 images of the test split of {root}"):
        image_splits(params, "shapes", clip)


def test_extract_stage_prints_one_error_line_for_a_bad_image_in_a_worker(clip, tmp_path, monkeypatch):
    root = _imagefolder_root(tmp_path)
    truncated = _truncated_jpeg(root / "train" / "blue_circle" / "1b.jpg")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_params(root, workers=1).model_dump(mode="json")))
    save_backbone(clip, tmp_path / "clip.safetensors", "tag:test")
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "extract",
            "--params",
            str(tmp_path / "params.yaml"),
            "--dataset",
            "shapes",
            "--model",
            str(tmp_path / "clip.safetensors"),
            "--out",
            str(tmp_path / "out"),
        ],
    )
    with pytest.raises(SystemExit) as exit_:
        extract_main()
    message = str(exit_.value.code)
    assert message.startswith(f"error: cannot decode image {truncated}") and "\n" not in message
    assert not (tmp_path / "out").exists()
