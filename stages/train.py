"""Stage `train@<task>`: train one expert per class of one task on its cached image features."""
from __future__ import annotations

from pathlib import Path

import torch

from moder.experts import save_experts
from moder.factory import ExpertFactory
from moder.features import read_features
from moder.params import Params
from moder.text import TextTower
from moder.train import TrainResult, train_experts
from moder.world import seed_for
from stages.common import check_task, load_backbone, parser, run_cli, tasks_of


def train(params: Params, task_name: str, pretrained: Path, features: Path, out: Path) -> TrainResult:
    """Reads <features>/<dataset>/{train,classes}.parquet; writes the task's experts to `out`."""
    check_task(params, task_name)
    clip = load_backbone(params, pretrained)
    identity = clip.identity.to_json()
    dataset = params.tasks[task_name].dataset
    samples = read_features(features / dataset / "train.parquet", identity)
    classes = read_features(features / dataset / "classes.parquet", identity)
    tasks = tasks_of(params, {dataset: len(classes.class_names)})
    position = [t.name for t in tasks].index(task_name)
    task = tasks[position]
    features, labels = samples.select(task.classes)
    names = [classes.class_names[i] for i in task.classes]
    earlier = [c for t in tasks[:position] for c in t.classes]  # earlier tasks of the same dataset (Class-IL)
    negatives = classes.vectors[earlier] if params.train.prior_negatives and earlier else None

    tower = TextTower(clip.model, clip.tokenizer)
    factory = ExpertFactory(tower, params.expert.spec(), list(classes.templates))
    generator = torch.Generator().manual_seed(seed_for(params.seed, "experts", task_name))
    result = train_experts(
        tower, factory.prompts(names), factory.new(len(names), generator), features, labels,
        params.train.config(seed_for(params.seed, "train", task_name)),
        zeroshot=classes.vectors[task.classes], negatives=negatives, progress=True,
    )
    save_experts(out, result.experts, names, identity, {"task": task_name, "dataset": dataset})
    print(f"trained {len(names)} {params.expert.kind} experts for task {task_name}: "
          f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}")
    return result


def main() -> None:
    cli = parser(__doc__, ("model", "the pre-trained CLIP checkpoint"), ("features", "the directory of feature directories"),
                 ("out", "the experts file to write (.safetensors)"))
    cli.add_argument("--task", required=True)
    run_cli(lambda args, params: train(params, args.task, args.model, args.features, args.out), cli.parse_args())


if __name__ == "__main__":
    main()
