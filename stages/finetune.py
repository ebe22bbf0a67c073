"""Stage `finetune`: the naive continual baseline, one text-side LoRA shared by every class, trained task after task."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from moder.baselines import finetune_rows
from moder.evaluation import AccuracyRow
from moder.factory import ExpertFactory
from moder.params import Params
from moder.text import TextTower
from moder.world import seed_for
from stages.common import load_frozen_clip, load_sequence, parser, read_split, run_shared_cli, write_rows


def finetune(params: Params, model: Path, features: Path, out: Path) -> list[AccuracyRow]:
    """Reads every dataset's features; writes the accuracy of every task after every step to `out`."""
    clip = load_frozen_clip(params, model)
    identity = clip.identity.to_json()
    sequence = load_sequence(params, features, identity)
    samples = {d: read_split(features, d, "train", identity) for d in {t.task.dataset for t in sequence}}
    train_sets = [samples[data.task.dataset].select(data.task.classes) for data in sequence]
    spec = dataclasses.replace(params.expert.spec(), kind="lora")  # the LoRA settings, whatever the experts' kind
    factory = ExpertFactory(TextTower(clip.model, clip.tokenizer), spec, params.templates)
    rows = finetune_rows(
        factory,
        sequence,
        train_sets,
        config_for=lambda task: params.train.config(seed_for(params.seed, "finetune", task.name)),
        protocol=params.benchmark.protocol,
        generator=torch.Generator().manual_seed(seed_for(params.seed, "finetune")),
    )
    write_rows(out, rows, AccuracyRow)
    return rows


def main() -> None:
    cli = parser(
        __doc__,
        ("model", "the backbone CLIP checkpoint"),
        ("features", "the directory of feature directories"),
        ("out", "the accuracy rows to write", ".parquet"),
    )
    run_shared_cli(lambda args, params: finetune(params, args.model, args.features, args.out), cli.parse_args())


if __name__ == "__main__":
    main()
