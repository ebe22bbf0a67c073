"""Few-shot training splits (extract.shots): the draw, what extraction decodes and records, its refusals."""

from pathlib import Path
from unittest import mock

import pytest
import torch
from PIL import Image

from moder.clip import save_backbone
from moder.features import read_features
from moder.params import ParamsError, parse_params
from moder.shots import ShotsError, draw_shots
from stages.extract import extract
from tests.conftest import MINI
from tests.layouts import imagefolder

LABELS = [0, 1, 2, 0, 1, 2, 0, 1, 0, 2, 0, 1, 0, 2, 0]  # classes a, b, c with 7, 4 and 4 images
NAMES = ["a", "b", "c"]


def _items(labels: list[int], names: list[str], kept: list[int]) -> set[tuple[str, int]]:
    """Each kept image as (its class, its rank among that class's images in the listing)."""
    rank = [labels[:i].count(y) for i, y in enumerate(labels)]
    return {(names[labels[i]], rank[i]) for i in kept}


def test_the_draw_keeps_n_distinct_images_per_class_the_same_for_a_seed():
    kept = draw_shots(LABELS, NAMES, 3, seed=0, dataset="d", where="w")
    assert kept == sorted(set(kept)) and len(kept) == 9
    assert [sum(LABELS[i] == y for i in kept) for y in range(3)] == [3, 3, 3]
    assert draw_shots(LABELS, NAMES, 3, seed=0, dataset="d", where="w") == kept
    assert draw_shots(LABELS, NAMES, 3, seed=1, dataset="d", where="w") != kept
    assert draw_shots(LABELS, NAMES, 3, seed=0, dataset="other", where="w") != kept
    every = draw_shots(LABELS, NAMES, 4, seed=0, dataset="d", where="w")  # all of b's and c's images
    assert {i for i in every if LABELS[i] != 0} == {i for i, y in enumerate(LABELS) if y != 0}


def test_a_class_draws_alone_whatever_other_classes_the_listing_holds():
    kept = _items(LABELS, NAMES, draw_shots(LABELS, NAMES, 2, seed=3, dataset="d", where="w"))
    # a class "z" listed first and in between: every position moves, the images kept of a, b and c do not
    labels = [3, 3] + [y for label in LABELS for y in (label, 3)]
    names = [*NAMES, "z"]
    wider = _items(labels, names, draw_shots(labels, names, 2, seed=3, dataset="d", where="w"))
    assert {item for item in wider if item[0] != "z"} == kept


@pytest.mark.parametrize(("labels", "short"), [(LABELS, "'b' of w has 4"), ([0, 0, 0, 0, 0], "'b' of w has 0")])
def test_a_class_with_fewer_images_than_shots_is_refused_naming_it(labels, short):
    shots = 5 if short.endswith("4") else 1
    with pytest.raises(ShotsError, match=f"extract.shots is {shots} but class {short} training") as error:
        draw_shots(labels, NAMES, shots, seed=0, dataset="d", where="w")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("shots", [0, -1, True, 2.5])
def test_shots_must_be_a_positive_integer(shots):
    with pytest.raises(ParamsError, match="extract.shots"):
        parse_params(MINI | {"extract": {**MINI["extract"], "shots": shots}})


def _imagefolder_params(root: Path, shots: int | None) -> object:
    data = MINI | {
        "datasets": {"shapes": {"source": "imagefolder", "root": str(root)}},
        "tasks": {"shapes": {"dataset": "shapes"}},
    }
    return parse_params(data | {"extract": {**MINI["extract"], "batch_size": 4, "shots": shots}})


def _extract_counting_decodes(params, dataset: str, model: Path, out: Path) -> list[Path]:
    """Runs the stage's extraction; returns the image files it opened."""
    opened = []
    real_open = Image.open

    def counting_open(path, *args, **kwargs):
        opened.append(Path(path))
        return real_open(path, *args, **kwargs)

    with mock.patch("moder.datasets.Image.open", counting_open):
        extract(params, dataset, model, out)
    return opened


def test_a_few_shot_image_dataset_decodes_only_the_training_images_it_keeps(clip, tmp_path):
    root = tmp_path / "images"
    imagefolder.write(root, n_classes=3, per_class=6)
    model = tmp_path / "clip.safetensors"
    save_backbone(clip, model, "tag:test")
    full = _extract_counting_decodes(_imagefolder_params(root, None), "shapes", model, tmp_path / "full")
    few = _extract_counting_decodes(_imagefolder_params(root, 2), "shapes", model, tmp_path / "few")
    assert len(full) == 36
    assert [p.parts[-3] for p in few].count("train") == 6 and [p.parts[-3] for p in few].count("test") == 18

    whole, kept_table = (
        read_features(tmp_path / "full" / "train.parquet"),
        read_features(tmp_path / "few" / "train.parquet"),
    )
    kept = draw_shots(whole.labels.tolist(), whole.class_names, 2, seed=MINI["seed"], dataset="shapes", where="")
    # the file records the draw; its rows are the full split's rows at the kept positions
    assert kept_table.shots == 2 and list(kept_table.kept) == kept and whole.shots is None and whole.kept == ()
    full_train = [path for path in full if path.parts[-3] == "train"]
    assert [path for path in few if path.parts[-3] == "train"] == [full_train[i] for i in kept]
    assert torch.equal(kept_table.labels, whole.labels[kept])
    assert torch.allclose(kept_table.vectors, whole.vectors[kept], atol=1e-6)
    test = read_features(tmp_path / "few" / "test.parquet")
    assert test.shots is None and torch.equal(test.vectors, read_features(tmp_path / "full" / "test.parquet").vectors)

    with pytest.raises(ShotsError, match=f"extract.shots is 7 but class '.*' of the train split of {root} has 6"):
        extract(_imagefolder_params(root, 7), "shapes", model, tmp_path / "too-many")
    assert not (tmp_path / "too-many").exists()


def test_a_few_shot_rendered_dataset_keeps_rendered_images_of_the_full_split(clip, tmp_path):
    model = tmp_path / "clip.safetensors"
    save_backbone(clip, model, "tag:test")
    extract(parse_params(MINI), "a", model, tmp_path / "full")
    few_params = parse_params(MINI | {"extract": {**MINI["extract"], "shots": 3}})
    extract(few_params, "a", model, tmp_path / "few")
    whole, few = read_features(tmp_path / "full" / "train.parquet"), read_features(tmp_path / "few" / "train.parquet")
    assert few.shots == 3 and len(few.kept) == 3 * MINI["datasets"]["a"]["classes"]
    assert torch.equal(few.labels, whole.labels[list(few.kept)])
    assert torch.allclose(few.vectors, whole.vectors[list(few.kept)], atol=1e-6)


def test_a_kept_image_that_cannot_be_decoded_leaves_the_record_and_the_rows_alike(clip, tmp_path):
    root = tmp_path / "images"
    imagefolder.write(root, n_classes=2, per_class=3)
    model = tmp_path / "clip.safetensors"
    save_backbone(clip, model, "tag:test")
    params = _imagefolder_params(root, 3)  # every training image kept
    bad = sorted((root / "train").rglob("*.png"))[1]
    bad.write_bytes(b"not an image")
    skipping = parse_params(
        params.model_dump(mode="json") | {"extract": {**params.extract.model_dump(), "skip_bad_images": True}}
    )
    extract(skipping, "shapes", model, tmp_path / "out")
    table = read_features(tmp_path / "out" / "train.parquet")
    assert table.shots == 3 and len(table.kept) == len(table.labels) == 5 and 1 not in table.kept
