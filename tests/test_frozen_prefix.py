"""Frozen-prefix reuse: the hidden states before the experts' first block, computed once per prompt, give the
same prototypes, training and composition as encoding every prompt through the whole tower."""

import pytest
import torch
import torch.nn.functional as F
from conftest import expert_params, random_lora, train_params

import moder.prompts
from moder.clip import load_clip
from moder.compose import compose_prototypes
from moder.factory import ExpertFactory
from moder.prompts import encode_prototypes, keep_frozen_prefix, template_prompts
from moder.text import TextTower
from moder.train import train_experts

# names of different lengths: a chunk of short prompts reads the leading positions of the kept states
NAMES = ["ox", "red circle", "a very long winded name of a small green square", "blue star", "yak", "tiny cube"]
TEMPLATES = ["a photo of a {}.", "a drawing of the {}, seen from far away.", "{}"]
# (LoRA layers, the first block they change) on a 4-block text tower: the last, the last two, every block
LAYERS = [([-1], 3), ([-2, -1], 2), (None, 0)]


@pytest.fixture(scope="module")
def tower():
    clip = load_clip("moder-tiny-clip", seed=0)  # four text blocks: a prefix of 2 or 3 of them is worth testing
    return TextTower(clip.model, clip.tokenizer)


def factory_for(tower: TextTower, layers: list[int] | None) -> ExpertFactory:
    spec = {"kind": "lora", "lora": {"rank": 2, "alpha": 4.0, "layers": layers, "modules": ["attn_in", "mlp_fc"]}}
    return ExpertFactory(tower, expert_params(spec), TEMPLATES)


def without_reuse(monkeypatch: pytest.MonkeyPatch) -> None:
    """No prompt set may keep its prefix: every encoding runs the whole tower."""
    monkeypatch.setattr(moder.prompts, "KEPT_PREFIX_FLOATS", 0)


class BlockCounter:
    """Counts the sequences each text block runs on."""

    def __init__(self, tower: TextTower, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sequences = [0] * tower.n_layers
        block = tower._block

        def counted(module, layer, x, *rest):
            self.sequences[layer] += x.shape[0]
            return block(module, layer, x, *rest)

        monkeypatch.setattr(tower, "_block", counted)


@pytest.mark.parametrize(("layers", "first"), LAYERS)
def test_prototypes_from_the_kept_prefix_equal_full_encoding(tower, monkeypatch, layers, first):
    monkeypatch.setattr(moder.prompts, "NO_GRAD_PROMPTS", 4)  # the states are kept in chunks of unequal lengths
    factory = factory_for(tower, layers)
    experts = random_lora(factory, len(NAMES))
    kept = factory.prompts(NAMES, keep_prefix=True)
    full = factory.prompts(NAMES)
    assert factory.first_layer == experts.first_layer == first
    assert (kept.prefix is None) == (first == 0) and kept.prefix_layers == first  # every block: nothing to reuse
    rows = torch.arange(len(NAMES))
    reference = encode_prototypes(tower, full, experts, rows)
    assert torch.allclose(encode_prototypes(tower, kept, experts, rows), reference, atol=1e-5, rtol=0)
    assert torch.allclose(encode_prototypes(tower, kept), encode_prototypes(tower, full), atol=1e-5, rtol=0)
    short = torch.tensor([0, 4])  # the two shortest names: a shorter truncation than the kept states'
    assert tower.sequence_length(kept.select(short).tokens) < tower.sequence_length(kept.tokens)
    partial = encode_prototypes(tower, kept.select(short), experts.select(short), torch.arange(2))
    assert torch.allclose(partial, reference[short], atol=1e-5, rtol=0)
    assert (reference - encode_prototypes(tower, full)).abs().max() > 1e-3  # the experts do change the encoder


@pytest.mark.parametrize(("layers", "first"), LAYERS)
def test_training_from_the_kept_prefix_equals_training_through_the_whole_tower(tower, monkeypatch, layers, first):
    factory = factory_for(tower, layers)
    generator = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(24, tower.text_projection.shape[1], generator=generator), dim=-1)
    labels = torch.arange(24) % len(NAMES)
    config = train_params(epochs=2, batch_size=8, lr=0.05, templates_per_step=2)
    monkeypatch.setattr(moder.train, "GRAD_PROMPTS", 6)  # both passes of a step, three chunks of classes

    def train():
        experts = factory.new(len(NAMES), torch.Generator().manual_seed(1))
        return train_experts(tower, factory.prompts(NAMES), experts, features, labels, config, seed=3)

    counter = BlockCounter(tower, monkeypatch)
    reused = train()
    runs = list(counter.sequences)
    with monkeypatch.context() as full:
        without_reuse(full)
        reference = train()
    # the first step's loss sees the same parameters through both encodings: equal to the float detail (logits
    # are scaled by 100); later steps see parameters that the float noise has moved (below), and so do their
    # losses (2.3e-5 relative on step 5 on one CPU)
    assert reused.losses[0] == pytest.approx(reference.losses[0], rel=1e-5)
    assert reused.losses == pytest.approx(reference.losses, rel=1e-4)
    # Adam divides each update by the gradient's running scale: float noise of 1e-6 grows to 1e-4 in six steps
    for mine, theirs in zip(reused.experts.parameters(), reference.experts.parameters(), strict=True):
        assert torch.allclose(mine, theirs, atol=1e-3, rtol=0)
    assert all(float(b.abs().max()) > 1e-2 for b in reference.experts.b.values())  # B starts at zero: it trained
    # 6 steps, each encoding 2 templates per class twice (the prototypes, then the chunks with gradient)
    assert runs[-1] == 6 * 2 * (len(NAMES) * 2)
    # block 0 once per prompt where it is frozen, else at every encoding
    assert runs[0] == (len(NAMES) * len(TEMPLATES) if first > 0 else runs[-1])


@pytest.mark.parametrize("space", ["parameter", "output"])
def test_composition_from_the_kept_prefix_equals_full_encoding(tower, monkeypatch, space):
    factory = factory_for(tower, [-1])
    bank = random_lora(factory, 4, seed=2)
    indices = torch.tensor([[0, 1], [2, -1], [3, 0], [1, 2], [0, -1], [3, 2]])
    weights = torch.softmax(torch.randn(len(NAMES), 2, generator=torch.Generator().manual_seed(4)), dim=1)
    prompts = factory.prompts(NAMES)

    def compose():
        return compose_prototypes(tower, prompts, bank, factory.null(), indices, weights, space)

    counter = BlockCounter(tower, monkeypatch)
    reused = compose()
    assert counter.sequences[:3] == [len(NAMES) * len(TEMPLATES)] * 3  # the frozen blocks once per prompt
    assert counter.sequences[3] == len(NAMES) * len(TEMPLATES) * (1 if space == "parameter" else 2)
    with monkeypatch.context() as full:
        without_reuse(full)
        reference = compose()
    assert torch.allclose(reused, reference, atol=1e-5, rtol=0)


def test_an_expert_acting_before_the_kept_prefix_is_refused(tower):
    prompts = factory_for(tower, [-1]).prompts(NAMES, keep_prefix=True)
    earlier = random_lora(factory_for(tower, [-2, -1]), len(NAMES))
    with pytest.raises(ValueError, match="experts act on block 2, before the prefix's block 3"):
        encode_prototypes(tower, prompts, earlier, torch.arange(len(NAMES)))


def test_a_prefix_over_the_memory_bound_is_not_kept(tower, monkeypatch):
    prompts = template_prompts(tower, NAMES, TEMPLATES)
    length = tower.sequence_length(prompts.tokens)
    floats = len(NAMES) * len(TEMPLATES) * length * tower.width
    monkeypatch.setattr(moder.prompts, "KEPT_PREFIX_FLOATS", floats)
    kept = keep_frozen_prefix(tower, prompts, 3)
    assert kept.prefix is not None and kept.prefix.shape == (len(NAMES) * len(TEMPLATES), length, tower.width)
    monkeypatch.setattr(moder.prompts, "KEPT_PREFIX_FLOATS", floats - 1)
    assert keep_frozen_prefix(tower, prompts, 3).prefix is None
