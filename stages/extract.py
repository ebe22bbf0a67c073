"""Stage `extract@<dataset>`: render a dataset, encode it with the frozen image tower, store features and prototypes."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moder.features import FeatureTable, write_features
from moder.io import atomic_directory
from moder.params import ParamsError, Params
from moder.pretrain import normalize_images
from moder.prompts import zeroshot_prototypes
from moder.text import TextTower
from moder.world import dataset_classes, render, seed_for
from stages.common import load_backbone, parser, run_cli


@torch.no_grad()
def encode_images(model: nn.Module, images: Tensor, batch_size: int) -> Tensor:
    return torch.cat([F.normalize(model.encode_image(images[i : i + batch_size]), dim=-1)
                      for i in range(0, len(images), batch_size)])


def extract(params: Params, dataset: str, pretrained: Path, out: Path) -> None:
    """Writes <out>/train.parquet, test.parquet (image features) and classes.parquet (zero-shot prototypes)."""
    if dataset not in params.datasets:
        raise ParamsError(f"unknown dataset {dataset!r}; params.yaml datasets: {', '.join(params.datasets)}")
    clip = load_backbone(params, pretrained)
    identity = clip.identity.to_json()
    world, spec = params.world.world(params.seed), params.datasets[dataset]
    classes = dataset_classes(world, spec.classes, dataset)
    names = [world.class_names[i] for i in classes]
    with atomic_directory(out) as directory:
        for split, per_class in (("train", params.extract.train_per_class), ("test", params.extract.test_per_class)):
            labels = torch.arange(len(classes)).repeat_interleave(per_class)
            generator = torch.Generator().manual_seed(seed_for(params.seed, "render", dataset, split))
            images = render(world, spec.domain(), dataset, classes[labels], generator)
            features = encode_images(clip.model, normalize_images(images, clip.identity.mean, clip.identity.std),
                                     params.extract.batch_size)
            write_features(directory / f"{split}.parquet", FeatureTable(features, labels, names, dataset, identity))
        prototypes = zeroshot_prototypes(TextTower(clip.model, clip.tokenizer), names, params.templates)
        write_features(directory / "classes.parquet",
                       FeatureTable(prototypes, torch.arange(len(names)), names, dataset, identity))
    print(f"extracted {dataset}: {len(names)} classes, {params.extract.train_per_class} train and "
          f"{params.extract.test_per_class} test images per class")


def main() -> None:
    cli = parser(__doc__, ("model", "the pre-trained CLIP checkpoint"), ("out", "the dataset's feature directory"))
    cli.add_argument("--dataset", required=True)
    run_cli(lambda args, params: extract(params, args.dataset, args.model, args.out), cli.parse_args())


if __name__ == "__main__":
    main()
