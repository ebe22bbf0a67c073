"""Stage `train@<dataset>`: train one expert per class for each split of one dataset (its tasks), in split order.

A dataset's splits are trained by one stage because a split may read what the earlier ones stored
(`train.negatives`); datasets never depend on each other. The stage reads no task list (the
tasks of a dataset are its splits, in order), so appending a task of another dataset leaves it be.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from moder.compose import expert_prototypes, smooth_toward_zeroshot
from moder.experts import Experts, save_experts
from moder.factory import ExpertFactory
from moder.features import FeatureTable
from moder.io import atomic_directory
from moder.params import Params, ParamsError
from moder.progress import PROGRESS
from moder.tasks import Task, dataset_tasks
from moder.text import TextTower
from moder.train import class_centroids, prototype_offsets, train_experts
from moder.world import seed_for
from stages.common import parser, run_cli
from stages.files import expert_file, load_frozen_clip, read_classes, read_split

USES_DEVICE = True


def negatives_and_anchors(
    params: Params,
    task: Task,
    earlier: list[Task],
    stored: dict[int, torch.Tensor],
    centroids: dict[int, torch.Tensor],
    classes: FeatureTable,
) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]:
    """While training `task`: the extra logit columns `train.negatives` asks for (text embeddings only: the
    earlier splits' stored prototypes first, then, for `dataset`, the untrained classes' zero-shot ones),
    and the anchors, the earlier classes' mean image features with the columns of their own prototypes."""
    if params.train.negatives == "none":
        return None, None
    trained = [c for t in earlier for c in t.classes]
    columns = [stored[c] for c in trained]
    if params.train.negatives == "dataset":
        untrained = set(range(len(classes.class_names))) - set(trained) - set(task.classes)
        columns += [classes.vectors[c] for c in sorted(untrained)]
    negatives = torch.stack(columns) if columns else None
    anchors = (torch.stack([centroids[c] for c in trained]), torch.arange(len(trained))) if trained else None
    return negatives, anchors


def train(params: Params, dataset: str, model: Path, features: Path, out: Path) -> dict[str, Experts]:
    """Reads <features>/<dataset>/{train,classes}.parquet; writes <out>/split-<i>.safetensors per split."""
    if dataset not in params.datasets:
        raise ParamsError(f"unknown dataset {dataset!r}; params.yaml datasets: {', '.join(params.datasets)}")
    clip = load_frozen_clip(params, model)
    identity = clip.identity.to_json()
    samples = read_split(features, dataset, "train", identity)
    classes = read_classes(features, dataset, identity)
    tower = TextTower(clip.model, clip.tokenizer)
    factory = ExpertFactory(tower, params.expert, list(classes.templates))
    tasks = dataset_tasks(params, dataset, len(classes.class_names))
    stored: dict[int, torch.Tensor] = {}  # class -> its prototype as evaluation will use it
    centroids: dict[int, torch.Tensor] = {}  # class -> its mean training image feature (train.anchor_earlier)
    trained = {}
    with atomic_directory(out, owner="train") as directory:
        for position, task in enumerate(tasks):
            trained[task.name] = _train_task(
                params,
                tower,
                factory,
                task,
                tasks[:position],
                samples,
                classes,
                stored,
                centroids,
                identity,
                expert_file(directory, task.step),
            )
    return trained


def _train_task(
    params: Params,
    tower: TextTower,
    factory: ExpertFactory,
    task: Task,
    earlier: list[Task],
    samples: FeatureTable,
    classes: FeatureTable,
    stored: dict[int, torch.Tensor],
    centroids: dict[int, torch.Tensor],
    identity: str,
    out: Path,
) -> Experts:
    """One task's experts, written to `out`; `stored` gains their classes' prototypes and `centroids` their
    mean image features (kept in memory for the dataset's later splits only: statistics, not images)."""
    task_features, labels = samples.select(task.classes)
    names = [classes.class_names[i] for i in task.classes]
    zeroshot = classes.vectors[task.classes]
    prompts = factory.prompts(names, keep_prefix=True)  # trained, then encoded once more for `own`
    generator = torch.Generator().manual_seed(seed_for(params.seed, "experts", task.dataset, str(task.step)))
    negatives, anchors = negatives_and_anchors(params, task, earlier, stored, centroids, classes)
    result = train_experts(
        tower,
        prompts,
        factory.new(len(names), generator),
        task_features,
        labels,
        params.train,
        seed=seed_for(params.seed, "train", task.dataset, str(task.step)),
        zeroshot=zeroshot,
        negatives=negatives,
        anchors=anchors,
        progress=PROGRESS.get(),
    )
    centroids.update(zip(task.classes, class_centroids(task_features.float(), labels, len(names)), strict=True))
    own = expert_prototypes(tower, prompts, result.experts)
    prototypes = smooth_toward_zeroshot(own, zeroshot, params.composition.alpha)
    stored.update(zip(task.classes, prototypes, strict=True))
    offsets = prototype_offsets(prototypes, zeroshot, task_features, labels)
    save_experts(
        out,
        result.experts,
        names,
        identity,
        {"dataset": task.dataset, "split": task.step, "offsets": [round(float(v), 6) for v in offsets]},
        prototypes=own,
    )
    print(
        f"trained {len(names)} {params.expert.kind} experts for {task.name}: "
        f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}"
    )
    return result.experts


def cli() -> argparse.ArgumentParser:
    cli = parser(
        __doc__,
        ("model", "the backbone CLIP checkpoint"),
        ("features", "the directory of feature directories"),
        ("out", "the dataset's experts directory (one .safetensors per task)"),
    )
    cli.add_argument("--dataset", required=True)
    return cli


def run(args: argparse.Namespace, params: Params) -> None:
    train(params, args.dataset, args.model, args.features, args.out)


def main() -> None:
    run_cli(run, cli().parse_args())


if __name__ == "__main__":
    main()
