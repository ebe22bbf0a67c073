"""Stage `extract@<dataset>`: encode a dataset's images with the frozen image tower, store features and prototypes.

An embedded dataset is rendered from the world; an image dataset is read from `datasets.<name>.root`
by its adapter (moder.datasets) and preprocessed with the backbone's own open_clip transform. An image
file that cannot be decoded fails the stage naming it, or with `extract.skip_bad_images` is left out
(with its label), and the stage prints how many were left out per split. With `extract.shots` the training
split keeps that many images per class, drawn from the seed before any image is decoded (moder/shots.py),
and the training feature file records which.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from moder.clip import LoadedClip, normalize_images
from moder.datasets import SPLITS, ImageSplit, Split, catalog, load_split
from moder.encode import encode_image_split, encode_images
from moder.features import FeatureTable, write_features
from moder.io import atomic_directory
from moder.params import DatasetParams, Params, ParamsError
from moder.prompts import zeroshot_prototypes
from moder.shots import draw_shots
from moder.text import TextTower
from moder.world import World, dataset_classes, render, seed_for
from stages.common import parser, run_cli
from stages.files import load_frozen_clip

USES_DEVICE = True

SHOWN_SKIPPED = 3  # undecodable images named in the stage's output, per split


Splits = dict[Split, tuple[Tensor, Tensor]]  # per split: (features, labels)


def kept_shots(
    params: Params, dataset: str, split: Split, labels: list[int], names: list[str], where: str
) -> list[int] | None:
    """Positions of the images a split keeps: the few-shot draw of the training split, else None (all)."""
    if split != "train" or params.extract.shots is None:
        return None
    return draw_shots(labels, names, params.extract.shots, params.seed, dataset, where)


def rendered_splits(params: Params, dataset: str, clip: LoadedClip) -> tuple[list[str], Splits, list[int] | None]:
    """An embedded dataset: its class names, per split (features, labels) of freshly rendered images, and
    the positions of the rendered training images kept (None: all)."""
    world, spec = World.of(params.world, params.seed), params.datasets[dataset]
    classes = dataset_classes(world, spec.classes, dataset, spec.class_offset)
    names = [world.class_names[i] for i in classes]
    splits, train_kept = {}, None
    for split, per_class in zip(SPLITS, (params.extract.train_per_class, params.extract.test_per_class), strict=True):
        labels = torch.arange(len(classes)).repeat_interleave(per_class)
        generator = torch.Generator().manual_seed(seed_for(params.seed, "render", dataset, split))
        # every image is rendered, so that the kept ones are those of the full split
        rendered = render(world, spec, dataset, classes[labels], generator)
        kept = kept_shots(params, dataset, split, labels.tolist(), names, f"the {split} split of {dataset}")
        if kept is not None:
            rendered, labels, train_kept = rendered[kept], labels[kept], kept
        batches = normalize_images(rendered, clip.identity.mean, clip.identity.std).split(params.extract.batch_size)
        splits[split] = (encode_images(clip.model, batches, params.model.device, params.extract.precision), labels)
    return names, splits, train_kept


def encode_split(params: Params, clip: LoadedClip, data: ImageSplit, where: str) -> tuple[Tensor, Tensor, list[str]]:
    """Features and labels of the decodable images of `data`, and the undecodable ones skipped (none
    unless params.extract.skip_bad_images; otherwise the first fails naming it)."""
    return encode_image_split(
        clip.model,
        data,
        batch_size=params.extract.batch_size,
        workers=params.extract.workers,
        device=params.model.device,
        precision=params.extract.precision,
        skip_bad_images=params.extract.skip_bad_images,
        where=where,
        skip_hint="extract.skip_bad_images: true in params.yaml skips such images",
        decode=params.extract.decode,
    )


def report_skipped(where: str, skipped: list[str]) -> None:
    """Skipped images are never silent: how many, and the first few."""
    if skipped:
        more = ", ..." if len(skipped) > SHOWN_SKIPPED else ""
        print(f"skipped {len(skipped)} undecodable image(s) of {where}: {', '.join(skipped[:SHOWN_SKIPPED])}{more}")


def image_splits(params: Params, dataset: str, clip: LoadedClip) -> tuple[list[str], Splits, list[int] | None]:
    """An image dataset on disk: its class names, per split (features, labels), and the positions of the
    training images kept in the adapter's listing (None: all); only the kept images are decoded."""
    spec = params.datasets[dataset]
    splits, names, train_kept = {}, [], None
    for split in SPLITS:
        assert spec.root is not None  # params validation requires a root for image datasets
        data = load_split(spec.source, spec.root, split)
        where = f"the {split} split of {spec.root}"
        kept = kept_shots(params, dataset, split, data.labels, data.class_names, where)
        if kept is not None:
            data, train_kept = data.subset(kept), kept
        features, labels, skipped = encode_split(params, clip, data.with_transform(clip.preprocess), where)
        report_skipped(where, skipped)
        if kept is not None and skipped:  # the record lists the kept images the file holds rows of
            gone = set(skipped)
            train_kept = [position for position, image in zip(kept, data.images, strict=True) if str(image) not in gone]
        splits[split] = (features, labels)
        names = data.class_names
    return names, splits, train_kept


def templates_of(params: Params, spec: DatasetParams) -> list[str]:
    """The dataset's own templates, else its catalog's (CLIP's), else params.yaml's."""
    if spec.templates is not None:
        return spec.templates
    if spec.source not in ("embedded", "imagefolder", "csv"):
        return catalog(spec.source).templates
    return params.templates


def extract(params: Params, dataset: str, model: Path, out: Path) -> None:
    """Writes <out>/train.parquet, test.parquet (image features) and classes.parquet (zero-shot prototypes)."""
    if dataset not in params.datasets:
        raise ParamsError(f"unknown dataset {dataset!r}; params.yaml datasets: {', '.join(params.datasets)}")
    clip = load_frozen_clip(params, model)
    identity = clip.identity.to_json()
    spec = params.datasets[dataset]
    names, splits, kept = (
        rendered_splits(params, dataset, clip) if spec.source == "embedded" else image_splits(params, dataset, clip)
    )
    templates = templates_of(params, spec)
    prototypes = zeroshot_prototypes(TextTower(clip.model, clip.tokenizer), names, templates)
    with atomic_directory(out, owner="extract") as directory:
        for split, (features, labels) in splits.items():
            table = FeatureTable(features, labels, names, dataset, identity)
            if split == "train" and kept is not None:
                table = replace(table, shots=params.extract.shots, kept=tuple(kept))
            write_features(directory / f"{split}.parquet", table)
        write_features(
            directory / "classes.parquet",
            FeatureTable(prototypes, torch.arange(len(names)), names, dataset, identity, tuple(templates)),
        )
    sizes = ", ".join(f"{len(labels)} {split}" for split, (_, labels) in splits.items())
    drawn = "" if kept is None else f" (train: {params.extract.shots} per class, drawn from seed {params.seed})"
    print(f"extracted {dataset}: {len(names)} classes, {sizes} images{drawn}, {len(templates)} templates")


def cli() -> argparse.ArgumentParser:
    cli = parser(__doc__, ("model", "the backbone CLIP checkpoint"), ("out", "the dataset's feature directory"))
    cli.add_argument("--dataset", required=True)
    return cli


def run(args: argparse.Namespace, params: Params) -> None:
    extract(params, args.dataset, args.model, args.out)


def main() -> None:
    run_cli(run, cli().parse_args())


if __name__ == "__main__":
    main()
