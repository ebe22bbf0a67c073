import pytest
import torch
from conftest import TEMPLATES, train_params

from moder.metrics import accuracy
from moder.prompts import zeroshot_prototypes
from moder.train import train_experts
from tests.synthetic import shifted_features

NAMES = [f"{c} {s}" for c in ("red", "green", "blue") for s in ("circle", "square", "star")]


def _problem(tower, seed=0):
    zeroshot = zeroshot_prototypes(tower, NAMES, TEMPLATES)
    groups = torch.arange(3).repeat_interleave(3)
    features, labels = shifted_features(
        zeroshot, groups, 20, shift=1.0, noise=0.3, generator=torch.Generator().manual_seed(seed)
    )
    return zeroshot, features, labels


def _train(tower, factory, config, seed=0, **kwargs):
    zeroshot, features, labels = _problem(tower)
    prompts = factory.prompts(NAMES)
    experts = factory.new(len(NAMES), torch.Generator().manual_seed(seed))
    return (
        zeroshot,
        features,
        labels,
        prompts,
        train_experts(tower, prompts, experts, features, labels, config, seed=seed, **kwargs),
    )


def test_training_lowers_loss_and_raises_accuracy_for_both_kinds(tower, lora_factory, context_factory):
    from moder.prompts import encode_prototypes

    for factory, lr in ((context_factory, 5e-3), (lora_factory, 1e-2)):
        zeroshot, features, labels, prompts, result = _train(
            tower, factory, train_params(epochs=15, batch_size=32, lr=lr)
        )
        before = accuracy(features, labels, zeroshot)
        after = accuracy(features, labels, encode_prototypes(tower, prompts, result.experts, torch.arange(len(NAMES))))
        assert before < 90.0, "the generated problem must leave room to improve"
        assert sum(result.losses[-3:]) < 0.5 * sum(result.losses[:3]), factory.spec.kind
        assert after > before + 10.0, (factory.spec.kind, before, after)


def test_training_is_deterministic_for_a_seed(tower, lora_factory):
    config = train_params(epochs=2, batch_size=16, lr=1e-2)
    first = _train(tower, lora_factory, config, seed=4)[-1]
    second = _train(tower, lora_factory, config, seed=4)[-1]
    assert first.losses == second.losses
    for name, tensor in first.experts.tensors().items():
        assert torch.equal(tensor, second.experts.tensors()[name])


def test_one_batched_forward_per_optimisation_step(tower, context_factory, monkeypatch):
    _, features, labels = _problem(tower)
    prompts = context_factory.prompts(NAMES)
    calls = []
    original = type(tower).encode
    monkeypatch.setattr(
        type(tower), "encode", lambda self, *a, **k: calls.append(a[0].shape[0]) or original(self, *a, **k)
    )
    train_experts(
        tower,
        prompts,
        context_factory.new(len(NAMES), torch.Generator()),
        features,
        labels,
        train_params(epochs=1, batch_size=60),
        seed=0,
    )  # 180 samples -> 3 steps
    assert calls == [len(NAMES)] * 3


def test_zero_shot_regularisation_keeps_prototypes_close(tower, context_factory):
    from moder.prompts import encode_prototypes

    def drift(reg):
        zeroshot, _, _, prompts, result = _train(
            tower,
            context_factory,
            train_params(epochs=5, lr=1e-2, reg_zeroshot=reg),
            zeroshot=zeroshot_prototypes(tower, NAMES, TEMPLATES),
        )
        own = encode_prototypes(tower, prompts, result.experts, torch.arange(len(NAMES)))
        return (1 - (own * zeroshot).sum(-1)).mean().item()

    assert drift(100.0) < drift(0.0)


def test_prior_prototypes_as_negatives_enter_the_loss(tower, context_factory):
    config = train_params(epochs=1, batch_size=180)
    plain = _train(tower, context_factory, config)[-1]
    negatives = zeroshot_prototypes(tower, ["pink star", "black circle", "white square"], TEMPLATES)
    with_negatives = _train(tower, context_factory, config, negatives=negatives)[-1]
    assert with_negatives.losses[0] > plain.losses[0]


def test_one_shared_expert_trains_on_every_class(tower, lora_factory):
    """rows of zeros: every class reads expert 0 (the finetune baseline's shared LoRA)."""
    from moder.prompts import encode_prototypes

    zeroshot, features, labels = _problem(tower)
    prompts = lora_factory.prompts(NAMES)
    shared = lora_factory.new(1, torch.Generator().manual_seed(0))
    everyone = torch.zeros(len(NAMES), dtype=torch.long)
    result = train_experts(
        tower,
        prompts,
        shared,
        features,
        labels,
        train_params(epochs=10, batch_size=32, lr=1e-2),
        seed=0,
        rows=everyone,
    )
    assert len(result.experts) == 1
    after = accuracy(features, labels, encode_prototypes(tower, prompts, result.experts, everyone))
    assert after > accuracy(features, labels, zeroshot) + 5.0


def test_prototype_offsets_measure_the_gain_on_other_classes_images():
    from moder.train import prototype_offsets

    zeroshot = torch.eye(3)
    prototypes = torch.nn.functional.normalize(
        torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), dim=-1
    )
    features = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    labels = torch.tensor([0, 1, 1, 2])
    offsets = prototype_offsets(prototypes, zeroshot, features, labels)
    # class 0 moved toward class 1's images: cos goes 0 -> 1/sqrt(2) on those two, 0 on class 2's image
    assert offsets.tolist() == pytest.approx([2 / 3 * 2**-0.5, 0.0, 0.0])
