"""Frozen-prefix reuse at ViT-B-16 shapes: the text blocks before the experts' first run once per prompt.

Side by side in one process, each with and without reuse (without: every prompt set too large to keep its
hidden states, so every encoding runs all 12 blocks, as before reuse existed):
- a training step of a 100-class task: MTIL's CIFAR-100 (100 catalog names x its 18 CLIP templates = 1,800
  prompts, every template each step as params.yaml trains, batch of 64 generated features); the one-time cost
  of computing the kept states is printed apart;
- the composition of 397 classes (MTIL's SUN397, 2 templates) from a hub of 804 random experts (the classes
  MTIL Order I trains before SUN397), k and the expert from params.yaml, in parameter and output space: with
  the states kept (as `moder classify` keeps them from the zero-shot encoding it needs first), and with them
  computed inside composition (as an evaluate stage does, a fresh process per step);
- `moder classify`'s head for those 397 names: their zero-shot prototypes, then their composition.
Random ViT-B-16 weights: time does not depend on their values. CPU float timings vary 10-20 % run to run.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from _common import committed, lora_label, median_seconds, vit_b16
from torch import Tensor

import moder.prompts
from moder.compose import compose_prototypes
from moder.datasets import catalog
from moder.experts import LoraExperts
from moder.factory import ExpertFactory
from moder.prompts import PromptSet, frozen_prototypes
from moder.train import train_experts
from stages.compose import compose_data

ROOT = Path(__file__).resolve().parents[1]
HUB_CLASSES = 804  # MTIL Order I's classes before SUN397
BATCH = 64


def no_reuse() -> AbstractContextManager[object]:
    """Within the block, no prompt set keeps its frozen prefix: every encoding runs the whole tower."""
    return mock.patch.object(moder.prompts, "KEPT_PREFIX_FLOATS", 0)


def mtil_classes(dataset: str) -> tuple[list[str], list[str]]:
    """A dataset's catalog class names and the templates MTIL Order I encodes it with."""
    spec = compose_data(ROOT / "conf", ["benchmark=mtil-order1"])["datasets"][dataset]
    templates = spec.get("templates") or catalog(spec["source"]).templates
    return list(catalog(spec["source"]).class_names), list(templates)


def seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `fn`; no warm-up run: each call takes seconds, far above any first-call cost."""
    return median_seconds(fn, repeats=repeats, warmup=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each measurement (median)")
    args = parser.parse_args()
    params = committed()
    _, tower = vit_b16()
    generator = torch.Generator().manual_seed(0)

    names, templates = mtil_classes("cifar100")
    factory = ExpertFactory(tower, params.expert, templates)
    experts = factory.new(len(names), generator)
    features = F.normalize(torch.randn(BATCH, tower.text_projection.shape[1], generator=generator), dim=-1)
    labels = torch.randint(0, len(names), (BATCH,), generator=generator)
    config = params.train.model_copy(update={"epochs": 1, "batch_size": BATCH, "anchor_earlier": 0.0})
    print(
        f"ViT-B-16 text tower (random weights), expert: {lora_label(params.expert.lora)}, the first block it changes "
        f"{factory.first_layer} of {tower.n_layers}; {torch.get_num_threads()} threads; median of {args.repeats}\n"
    )
    print("| measured | without reuse s | with reuse s | ratio |")
    print("|---|---|---|---|")
    kept = factory.prompts(names, keep_prefix=True)
    keeping = seconds(lambda: factory.prompts(names, keep_prefix=True), args.repeats)
    step = seconds(lambda: train_experts(tower, kept, experts, features, labels, config, seed=0), args.repeats)
    with no_reuse():
        prompts = factory.prompts(names)
        full = seconds(lambda: train_experts(tower, prompts, experts, features, labels, config, seed=0), args.repeats)
    task = f"{len(names)} classes x {len(templates)} templates"
    print(f"| training step, {task}, states kept | {full:.1f} | {step:.1f} | {full / step:.1f}x |")
    print(f"| keeping the states of those {len(names) * len(templates)} prompts (once per task) | | {keeping:.1f} | |")

    names, templates = mtil_classes("sun397")
    factory = ExpertFactory(tower, params.expert, templates)
    bank = factory.new(HUB_CLASSES, generator)
    assert isinstance(bank, LoraExperts)  # the committed expert
    for b in bank.b.values():  # trained experts are not zero: the composed deltas really change the encoder
        b.normal_(0, 0.02, generator=generator)
    k = params.retrieval.k
    indices = torch.randint(0, HUB_CLASSES, (len(names), k), generator=generator)
    weights = torch.softmax(torch.randn(len(names), k, generator=generator), dim=1)
    prompts, kept = factory.prompts(names), factory.prompts(names, keep_prefix=True)
    for space in ("parameter", "output"):

        def compose(prompt_set: PromptSet, space: str = space) -> Callable[[], Tensor]:
            return lambda: compose_prototypes(tower, prompt_set, bank, factory.null(), indices, weights, space)

        inside = seconds(compose(prompts), args.repeats)
        given = seconds(compose(kept), args.repeats)
        with no_reuse():
            full = seconds(compose(prompts), args.repeats)
        what = f"composition of {len(names)} classes x {len(templates)} templates, {space} space, k={k}"
        print(f"| {what}, states kept | {full:.1f} | {given:.1f} | {full / given:.1f}x |")
        print(f"| {what}, states computed inside | {full:.1f} | {inside:.1f} | {full / inside:.1f}x |")

    def head() -> None:
        """What `moder classify` does for names it has not trained: zero-shot prototypes (retrieval's queries),
        then composition, from one prompt set (keeping its states where reuse is on)."""
        prompt_set = factory.prompts(names, keep_prefix=True)
        frozen_prototypes(tower, prompt_set)
        compose_prototypes(tower, prompt_set, bank, factory.null(), indices, weights, "parameter")

    reused = seconds(head, args.repeats)
    with no_reuse():
        full = seconds(head, args.repeats)
    what = f"zero-shot + composition of {len(names)} classes, parameter space (moder classify's head)"
    print(f"| {what} | {full:.1f} | {reused:.1f} | {full / reused:.1f}x |")


if __name__ == "__main__":
    main()
