import torch
from conftest import CLASSES, TEMPLATES, merged_lora_model, random_lora

from moder.compose import compose_parameters, compose_prototypes, seen_prototypes
from moder.hub import NULL_EXPERT
from moder.prompts import encode_prototypes, template_prompts, zeroshot_prototypes

UNSEEN = ["orange circle", "pink star"]


def _own_prototypes(tower, prompts, experts, rows):
    return encode_prototypes(tower, prompts, experts, torch.tensor(rows))


def test_single_expert_with_weight_one_is_that_expert_in_both_spaces(tower, lora_factory, context_factory):
    for factory, bank in (
        (lora_factory, random_lora(lora_factory, 4)),
        (context_factory, context_factory.new(4, torch.Generator())),
    ):
        if factory is context_factory:
            bank.ctx += torch.randn(bank.ctx.shape, generator=torch.Generator().manual_seed(5))
        prompts = factory.prompts(UNSEEN)
        indices, weights = torch.tensor([[2], [0]]), torch.ones(2, 1)
        expected = _own_prototypes(tower, prompts, bank, [2, 0])
        for space in ("parameter", "output"):
            composed = compose_prototypes(tower, prompts, bank, factory.null(), indices, weights, space)
            assert torch.allclose(composed, expected, atol=1e-5, rtol=0), (factory.spec.kind, space)


def test_parameter_space_lora_composition_equals_merged_weights_model(clip, tower, lora_factory):
    bank = random_lora(lora_factory, 3, seed=7)
    weights = torch.tensor([[0.5, 0.3, 0.2]])
    composed = compose_parameters(bank, lora_factory.null(), torch.tensor([[2, 0, 1]]), weights)
    assert next(iter(composed.a.values())).shape[1] == 3 * bank.rank  # one rank k*r LoRA
    merged = merged_lora_model(clip.model, bank, [2, 0, 1], weights[0])
    tokens = tower.tokenize(["a photo of a orange circle.", "a drawing of a pink star."])
    ours = tower.encode(tokens, composed, torch.zeros(2, dtype=torch.long))
    assert torch.allclose(ours, merged.encode_text(tokens, normalize=True), atol=1e-5, rtol=0)


def test_parameter_space_context_composition_is_weighted_mean_of_tokens(context_factory):
    bank = context_factory.new(3, torch.Generator())
    bank.ctx += torch.randn(bank.ctx.shape, generator=torch.Generator().manual_seed(1))
    weights = torch.tensor([[0.6, 0.4], [0.25, 0.75]])
    composed = compose_parameters(bank, context_factory.null(), torch.tensor([[0, 2], [1, NULL_EXPERT]]), weights)
    assert torch.allclose(composed.ctx[0], 0.6 * bank.ctx[0] + 0.4 * bank.ctx[2])
    assert torch.allclose(composed.ctx[1], 0.25 * bank.ctx[1] + 0.75 * context_factory.null().ctx[0])


def test_null_expert_alone_returns_zero_shot_for_lora(tower, lora_factory):
    bank = random_lora(lora_factory, 2)
    prompts = lora_factory.prompts(UNSEEN)
    zeroshot = zeroshot_prototypes(tower, UNSEEN, TEMPLATES)
    indices, weights = torch.full((2, 1), NULL_EXPERT), torch.ones(2, 1)
    for space in ("parameter", "output"):
        composed = compose_prototypes(tower, prompts, bank, lora_factory.null(), indices, weights, space)
        assert torch.allclose(composed, zeroshot, atol=1e-5, rtol=0)


def test_output_space_is_normalised_weighted_mean_of_expert_outputs(tower, lora_factory):
    bank = random_lora(lora_factory, 3, seed=2)
    prompts = lora_factory.prompts(UNSEEN)
    indices, weights = torch.tensor([[0, 1], [2, 0]]), torch.tensor([[0.7, 0.3], [0.5, 0.5]])
    composed = compose_prototypes(tower, prompts, bank, lora_factory.null(), indices, weights, "output")
    by_expert = [_own_prototypes(tower, prompts, bank, [e, e]) for e in range(3)]
    expected = torch.stack(
        [0.7 * by_expert[0][0] + 0.3 * by_expert[1][0], 0.5 * by_expert[2][1] + 0.5 * by_expert[0][1]]
    )
    assert torch.allclose(composed, torch.nn.functional.normalize(expected, dim=-1), atol=1e-5, rtol=0)


def test_seen_prototypes_interpolate_toward_zero_shot(tower, lora_factory):
    experts = random_lora(lora_factory, len(CLASSES))
    prompts = template_prompts(tower, CLASSES, TEMPLATES)
    zeroshot = zeroshot_prototypes(tower, CLASSES, TEMPLATES)
    own = _own_prototypes(tower, prompts, experts, list(range(len(CLASSES))))
    assert torch.allclose(seen_prototypes(tower, prompts, experts, zeroshot, 1.0), own, atol=1e-6)
    assert torch.allclose(seen_prototypes(tower, prompts, experts, zeroshot, 0.0), zeroshot, atol=1e-6)
    half = seen_prototypes(tower, prompts, experts, zeroshot, 0.5)
    assert torch.allclose(half, torch.nn.functional.normalize(own + zeroshot, dim=-1), atol=1e-6)


def test_unknown_space_is_an_error(tower, lora_factory):
    import pytest

    with pytest.raises(ValueError, match="allowed: parameter, output"):
        compose_prototypes(
            tower,
            lora_factory.prompts(UNSEEN),
            None,
            lora_factory.null(),
            torch.full((2, 1), NULL_EXPERT),
            torch.ones(2, 1),
            "weights",
        )
