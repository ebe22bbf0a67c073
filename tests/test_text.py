import torch
from conftest import CLASSES, TEMPLATES, merged_lora_model, random_lora

from moder.experts import ContextExperts
from moder.prompts import encode_prototypes, template_prompts


def test_truncated_encoding_equals_full_context(clip, tower):
    tokens = tower.tokenize(["a red star.", "a much longer prompt about a small green square on white", "x"])
    assert tower.sequence_length(tokens) < tokens.shape[1]
    reference = clip.model.encode_text(tokens, normalize=True)
    truncated = tower.encode(tokens)
    full = tower.encode(tokens, truncate=False)
    assert torch.allclose(truncated, reference, atol=1e-5, rtol=0)
    assert torch.allclose(full, reference, atol=1e-5, rtol=0)


def test_sequence_length_is_longest_prompt_through_end_of_text(tower):
    tokens = tower.tokenize(["a b", "a b c d"])
    # start-of-text, four words, end-of-text
    assert tower.sequence_length(tokens) == 6


def test_lora_with_zero_b_reproduces_frozen_model(tower, lora_factory):
    prompts = template_prompts(tower, CLASSES, TEMPLATES)
    experts = lora_factory.new(len(CLASSES), torch.Generator().manual_seed(1))
    assert all(float(b.abs().max()) == 0.0 for b in experts.b.values())
    frozen = encode_prototypes(tower, prompts)
    adapted = encode_prototypes(tower, prompts, experts, torch.arange(len(CLASSES)))
    assert torch.equal(adapted, frozen)


def test_batched_lora_experts_equal_per_class_loop(tower, lora_factory):
    prompts = template_prompts(tower, CLASSES, TEMPLATES)
    experts = random_lora(lora_factory, len(CLASSES))
    batched = tower.encode(prompts.tokens, experts, torch.arange(len(CLASSES)).repeat_interleave(len(TEMPLATES)))
    for c in range(len(CLASSES)):
        one = experts.select(torch.tensor([c]))
        rows = prompts.tokens[c * len(TEMPLATES) : (c + 1) * len(TEMPLATES)]
        looped = tower.encode(rows, one, torch.zeros(len(rows), dtype=torch.long))
        assert torch.allclose(batched[c * len(TEMPLATES) : (c + 1) * len(TEMPLATES)], looped, atol=1e-5, rtol=0)
    # and the experts really differ from the frozen encoder
    assert (batched - tower.encode(prompts.tokens)).abs().max() > 1e-3


def test_lora_expert_equals_merged_weights_model(clip, tower, lora_factory):
    experts = random_lora(lora_factory, 1, seed=3)
    merged = merged_lora_model(clip.model, experts, [0], [1.0])
    tokens = tower.tokenize(["a photo of a red circle.", "a drawing of a blue star on a long line"])
    adapted = tower.encode(tokens, experts, torch.zeros(2, dtype=torch.long))
    assert torch.allclose(adapted, merged.encode_text(tokens, normalize=True), atol=1e-5, rtol=0)


def test_context_expert_at_init_equals_its_prompt(clip, tower, context_factory):
    prompts = context_factory.prompts(CLASSES)
    experts = context_factory.new(len(CLASSES), torch.Generator())
    adapted = tower.encode(prompts.tokens, experts, torch.arange(len(CLASSES)))
    reference = clip.model.encode_text(tower.tokenize([f"a photo of a {name}." for name in CLASSES]), normalize=True)
    assert torch.allclose(adapted, reference, atol=1e-5, rtol=0)


def test_batched_context_experts_equal_per_class_loop(tower, context_factory):
    prompts = context_factory.prompts(CLASSES)
    experts = ContextExperts(torch.randn(len(CLASSES), 4, tower.width, generator=torch.Generator().manual_seed(2)))
    batched = tower.encode(prompts.tokens, experts, torch.arange(len(CLASSES)))
    for c in range(len(CLASSES)):
        looped = tower.encode(
            prompts.tokens[c : c + 1], experts.select(torch.tensor([c])), torch.zeros(1, dtype=torch.long)
        )
        assert torch.allclose(batched[c : c + 1], looped, atol=1e-5, rtol=0)


def test_experts_moved_to_a_device_pass_gradients_back_to_the_originals():
    """TextTower.encode moves the experts in use to its device; training's parameters stay where they were."""
    from moder.experts import LoraExperts

    a = {"0.attn_out": torch.randn(2, 1, 4, requires_grad=True)}
    b = {"0.attn_out": torch.randn(2, 4, 1, requires_grad=True)}
    experts = LoraExperts(a, b, 2.0)
    moved = experts.select(torch.tensor([1])).to("cpu")
    assert torch.equal(moved.a["0.attn_out"], a["0.attn_out"][1:]) and moved.scaling == 2.0
    (moved.a["0.attn_out"].sum() + 2 * moved.b["0.attn_out"].sum()).backward()
    assert a["0.attn_out"].grad[0].abs().sum() == 0 and torch.equal(a["0.attn_out"].grad[1], torch.ones(1, 4))
    assert torch.equal(b["0.attn_out"].grad[1], torch.full((4, 1), 2.0))


def test_last_block_at_the_pooled_position_only_equals_the_whole_block(tower, lora_factory, monkeypatch):
    """The last block computes only the position pooling reads; its outputs and the experts' gradients are those
    of the whole block."""
    prompts = template_prompts(tower, CLASSES, TEMPLATES)
    rows = torch.arange(len(CLASSES)).repeat_interleave(len(TEMPLATES))

    def encoded_and_gradients():
        experts = random_lora(lora_factory, len(CLASSES))
        parameters = [p.requires_grad_(True) for p in experts.parameters()]
        out = tower.encode(prompts.tokens, experts, rows)
        (out * torch.linspace(-1, 1, out.shape[1])).sum().backward()
        return out.detach(), [p.grad for p in parameters]

    pooled, pooled_gradients = encoded_and_gradients()
    monkeypatch.setattr(tower, "pool_last_block", False)  # every position through every block
    whole, whole_gradients = encoded_and_gradients()
    assert torch.allclose(pooled, whole, atol=1e-5, rtol=0)
    for mine, theirs in zip(pooled_gradients, whole_gradients, strict=True):
        assert theirs is not None and float(theirs.abs().max()) > 0
        assert torch.allclose(mine, theirs, atol=1e-5, rtol=1e-4)
