import copy

import pytest
import torch

from moder.clip import load_clip
from moder.factory import ExpertFactory, ExpertSpec
from moder.text import TextTower

TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]
CLASSES = ["red circle", "green square", "blue star", "yellow triangle", "purple hexagon"]


@pytest.fixture(scope="session")
def clip():
    return load_clip("moder-micro-clip", seed=0)


@pytest.fixture(scope="session")
def tower(clip):
    return TextTower(clip.model, clip.tokenizer)


def random_lora(factory: ExpertFactory, n: int, seed: int = 0):
    """LoRA experts with non-zero B, so that every expert really changes the encoder."""
    generator = torch.Generator().manual_seed(seed)
    experts = factory.new(n, generator)
    for target, b in experts.b.items():
        experts.b[target] = torch.randn(b.shape, generator=generator) * 0.2
    return experts


@pytest.fixture(scope="session")
def lora_factory(tower):
    return ExpertFactory(tower, ExpertSpec(kind="lora", lora_rank=2, lora_alpha=4.0), TEMPLATES)


@pytest.fixture(scope="session")
def context_factory(tower):
    return ExpertFactory(tower, ExpertSpec(kind="context"), TEMPLATES)


def merged_lora_model(model, experts, rows, weights):
    """A copy of `model` whose text weights absorb sum_j weights[j] * scaling * B[rows[j]] @ A[rows[j]]."""
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for target in experts.a:
            layer, module = target.split(".")
            weight, _ = TextTower.linear_weight(merged.transformer.resblocks[int(layer)], module)
            for row, w in zip(rows, weights):
                weight += w * experts.scaling * experts.b[target][row] @ experts.a[target][row]
    return merged
