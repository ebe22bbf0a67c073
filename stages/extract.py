"""Stage `extract@<dataset>`: encode a dataset's images with the frozen image tower, store features and prototypes.

An embedded dataset is rendered from the world; an image dataset is read from `datasets.<name>.root`
by its adapter (moder.datasets) and preprocessed with the backbone's own open_clip transform.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from moder.clip import LoadedClip
from moder.datasets import catalog, load_split
from moder.features import FeatureTable, encode_images, write_features
from moder.io import atomic_directory
from moder.params import DatasetParams, ParamsError, Params
from moder.pretrain import normalize_images
from moder.prompts import zeroshot_prototypes
from moder.text import TextTower
from moder.world import dataset_classes, render, seed_for
from stages.common import load_backbone, parser, run_cli

SPLITS = ("train", "test")


def rendered_splits(params: Params, dataset: str, clip: LoadedClip) -> tuple[list[str], dict[str, tuple]]:
    """An embedded dataset: its class names, and per split (features, labels) of freshly rendered images."""
    world, spec = params.world.world(params.seed), params.datasets[dataset]
    classes = dataset_classes(world, spec.classes, dataset)
    splits = {}
    for split, per_class in zip(SPLITS, (params.extract.train_per_class, params.extract.test_per_class)):
        labels = torch.arange(len(classes)).repeat_interleave(per_class)
        generator = torch.Generator().manual_seed(seed_for(params.seed, "render", dataset, split))
        images = normalize_images(render(world, spec.domain(), dataset, classes[labels], generator),
                                  clip.identity.mean, clip.identity.std)
        batches = images.split(params.extract.batch_size)
        splits[split] = (encode_images(clip.model, batches, params.model.device, params.extract.precision), labels)
    return [world.class_names[i] for i in classes], splits


def image_splits(params: Params, spec: DatasetParams, clip: LoadedClip) -> tuple[list[str], dict[str, tuple]]:
    """An image dataset on disk: its class names, and per split (features, labels)."""
    splits, names = {}, None
    for split in SPLITS:
        data = load_split(spec.source, spec.root, split).with_transform(clip.preprocess)
        loader = DataLoader(data, batch_size=params.extract.batch_size, num_workers=params.extract.workers,
                            pin_memory=params.model.device.startswith("cuda"))
        batches = (images for images, _ in loader)
        splits[split] = (encode_images(clip.model, batches, params.model.device, params.extract.precision),
                         torch.tensor(data.labels))
        names = data.class_names
    return names, splits


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
    clip = load_backbone(params, model)
    identity = clip.identity.to_json()
    spec = params.datasets[dataset]
    names, splits = (rendered_splits(params, dataset, clip) if spec.source == "embedded"
                     else image_splits(params, spec, clip))
    templates = templates_of(params, spec)
    prototypes = zeroshot_prototypes(TextTower(clip.model, clip.tokenizer), names, templates)
    with atomic_directory(out) as directory:
        for split, (features, labels) in splits.items():
            write_features(directory / f"{split}.parquet", FeatureTable(features, labels, names, dataset, identity))
        write_features(directory / "classes.parquet",
                       FeatureTable(prototypes, torch.arange(len(names)), names, dataset, identity, tuple(templates)))
    sizes = ", ".join(f"{len(labels)} {split}" for split, (_, labels) in splits.items())
    print(f"extracted {dataset}: {len(names)} classes, {sizes} images, {len(templates)} templates")


def main() -> None:
    cli = parser(__doc__, ("model", "the backbone CLIP checkpoint"), ("out", "the dataset's feature directory"))
    cli.add_argument("--dataset", required=True)
    run_cli(lambda args, params: extract(params, args.dataset, args.model, args.out), cli.parse_args())


if __name__ == "__main__":
    main()
