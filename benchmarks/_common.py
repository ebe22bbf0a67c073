"""Shared set-up for the benchmark scripts: the ViT-B-16 text tower and a timer."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from moder.clip import OpenClipModel, load_clip
from moder.params import LoraParams, Params, load_params
from moder.text import TextTower

CLASS_NAMES = Path(__file__).with_name("cifar100_classes.txt").read_text().split("\n")[:100]
TEMPLATE = "a photo of a {}."


def committed() -> Params:
    """The committed settings (params.yaml, composed from conf/): the expert and training they measure."""
    return load_params(Path(__file__).resolve().parents[1] / "params.yaml")


def lora_label(lora: LoraParams) -> str:
    """The LoRA expert a benchmark measures, as its output names it."""
    return f"rank-{lora.rank} LoRA on layers {lora.layers} ({', '.join(lora.modules)})"


def vit_b16(device: str = "cpu") -> tuple[OpenClipModel, TextTower]:
    """ViT-B-16 with random weights (timing does not depend on their values) and its text tower."""
    clip = load_clip("ViT-B-16", device=device, seed=0)
    return clip.model, TextTower(clip.model, clip.tokenizer)


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
