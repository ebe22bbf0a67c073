"""Stage `finetune`: the naive continual baseline, one text-side LoRA shared by every class, trained task after task."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from moder.baselines import finetune_rows
from moder.factory import ExpertFactory
from moder.params import Params
from moder.results import AccuracyRow
from moder.text import TextTower
from moder.world import seed_for
from stages.common import parser, run_cli
from stages.files import load_frozen_clip, load_sequence, read_split, write_rows

USES_DEVICE = True


def finetune(params: Params, model: Path, features: Path, out: Path) -> list[AccuracyRow]:
    """Reads every dataset's features; writes the accuracy of every task after every step to `out`."""
    clip = load_frozen_clip(params, model)
    identity = clip.identity.to_json()
    sequence = load_sequence(params, features, identity)
    samples = {d: read_split(features, d, "train", identity) for d in {t.task.dataset for t in sequence}}
    train_sets = [samples[data.task.dataset].select(data.task.classes) for data in sequence]
    spec = params.expert.model_copy(update={"kind": "lora"})  # the LoRA settings, whatever the experts' kind
    factory = ExpertFactory(TextTower(clip.model, clip.tokenizer), spec, params.templates)
    rows = finetune_rows(
        factory,
        sequence,
        train_sets,
        config=params.train,
        seed_for=lambda task: seed_for(params.seed, "finetune", task.name),
        protocol=params.benchmark.protocol,
        generator=torch.Generator().manual_seed(seed_for(params.seed, "finetune")),
    )
    write_rows(out, rows, AccuracyRow)
    return rows


def cli() -> argparse.ArgumentParser:
    return parser(
        __doc__,
        ("model", "the backbone CLIP checkpoint"),
        ("features", "the directory of feature directories"),
        ("out", "the accuracy rows to write", ".parquet"),
    )


def run(args: argparse.Namespace, params: Params) -> None:
    finetune(params, args.model, args.features, args.out)


def main() -> None:
    run_cli(run, cli().parse_args())


if __name__ == "__main__":
    main()
