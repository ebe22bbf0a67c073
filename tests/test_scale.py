"""Bounded memory and O(T) cost: chunked paths equal the one-shot ones, and evaluation never re-encodes
what training already encoded."""

import pytest
import torch
from conftest import CLASSES, DATA, MINI, MODEL, TEMPLATES, random_lora, train_params

import moder.compose
import moder.train
from moder.compose import compose_prototypes, expert_prototypes
from moder.experts import ExpertFileError, load_experts, save_experts
from moder.factory import ExpertFactory
from moder.hub import NULL_EXPERT
from moder.params import parse_params
from moder.prompts import template_prompts
from moder.text import TextTower
from moder.train import sample_templates, train_experts
from stages.evaluate import evaluate
from stages.files import load_frozen_clip, read_task_experts

QUERIES = ["orange circle", "pink star", "white square", "black ring", "grey cross", "teal diamond", "navy heart"]


def _retrieval(n_queries: int, bank_size: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(bank_size, generator=generator)[:k] for _ in range(n_queries)])
    indices[::3, -1] = NULL_EXPERT  # some queries also retrieve the frozen model
    weights = torch.softmax(torch.randn(n_queries, k, generator=generator), dim=1)
    return indices, weights


@pytest.mark.parametrize("space", ["parameter", "output"])
@pytest.mark.parametrize("kind", ["lora", "context"])
def test_chunked_composition_equals_composing_every_query_at_once(
    tower, lora_factory, context_factory, monkeypatch, space, kind
):
    factory = lora_factory if kind == "lora" else context_factory
    bank = random_lora(factory, 6, seed=3) if kind == "lora" else factory.new(6, torch.Generator())
    if kind == "context":
        bank.ctx += torch.randn(bank.ctx.shape, generator=torch.Generator().manual_seed(4))
    prompts = factory.prompts(QUERIES)
    indices, weights = _retrieval(len(QUERIES), 6, 3, seed=5)
    at_once = compose_prototypes(tower, prompts, bank, factory.null(), indices, weights, space)
    monkeypatch.setattr(moder.compose, "COMPOSED_FLOATS", 1)  # one query class per chunk
    assert moder.compose.composition_chunk(factory.null(), 3, prompts.per_class) == 1
    chunked = compose_prototypes(tower, prompts, bank, factory.null(), indices, weights, space)
    assert (chunked - at_once).abs().max() <= 1e-5


def test_a_class_expert_applied_to_its_prompts_at_once_equals_one_copy_per_prompt(tower, lora_factory):
    experts = random_lora(lora_factory, len(CLASSES), seed=1)
    prompts = template_prompts(tower, CLASSES, TEMPLATES)
    grouped = tower.encode(prompts.tokens, experts, torch.arange(len(CLASSES)), sequences_per_expert=len(TEMPLATES))
    per_prompt = tower.encode(prompts.tokens, experts, torch.arange(len(CLASSES)).repeat_interleave(len(TEMPLATES)))
    assert (grouped - per_prompt).abs().max() <= 1e-5
    with pytest.raises(ValueError, match=r"one expert row per 1 sequence\(s\), for 10 sequences"):
        tower.encode(prompts.tokens, experts, torch.arange(len(CLASSES)))  # one row per class, runs not said


def _train(tower, factory, features, labels, **change):
    prompts = factory.prompts(CLASSES)
    experts = random_lora(factory, len(CLASSES), seed=2)
    config = train_params(**{"epochs": 1, "batch_size": 8, "lr": 1e-2, **change})
    return train_experts(tower, prompts, experts, features, labels, config, seed=0)


def test_training_in_class_chunks_takes_the_same_steps_as_one_forward(tower, lora_factory, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(len(CLASSES)).repeat(4)
    features = torch.randn(len(labels), 32, generator=generator)
    whole = _train(tower, lora_factory, features, labels)
    monkeypatch.setattr(moder.train, "GRAD_PROMPTS", len(TEMPLATES))  # one class per backward chunk
    chunked = _train(tower, lora_factory, features, labels)
    assert chunked.losses == pytest.approx(whole.losses, abs=1e-5)
    for a, b in zip(whole.experts.parameters(), chunked.experts.parameters(), strict=True):
        assert (a - b).abs().max() <= 1e-5


def test_template_sampling_draws_per_class_without_replacement_and_is_seeded(tower):
    templates = [f"{word} {{}}." for word in ("a", "the", "one", "my", "your", "our")]
    prompts = template_prompts(tower, CLASSES, templates)
    first = sample_templates(prompts, 3, torch.Generator().manual_seed(7))
    again = sample_templates(prompts, 3, torch.Generator().manual_seed(7))
    assert first.per_class == 3 and first.n_classes == len(CLASSES) and torch.equal(first.tokens, again.tokens)
    for c in range(len(CLASSES)):
        own = {tuple(t) for t in prompts.tokens[c * 6 : (c + 1) * 6].tolist()}
        drawn = [tuple(t) for t in first.tokens[c * 3 : (c + 1) * 3].tolist()]
        assert len(set(drawn)) == 3 and set(drawn) <= own  # three different templates of this class
    drawn_sets = {frozenset(tuple(t) for t in first.tokens[c * 3 : (c + 1) * 3, 1:3].tolist()) for c in range(5)}
    assert len(drawn_sets) > 1  # classes draw independently (the templates' first words differ per class)
    generator = torch.Generator().manual_seed(7)
    assert sample_templates(prompts, 6, generator) is prompts and sample_templates(prompts, None, generator) is prompts
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(7).get_state())  # nothing drawn


def test_templates_per_step_at_the_template_count_trains_exactly_as_all_templates(tower, lora_factory):
    labels = torch.arange(len(CLASSES)).repeat(2)
    features = torch.randn(len(labels), 32, generator=torch.Generator().manual_seed(1))
    every = _train(tower, lora_factory, features, labels)
    same = _train(tower, lora_factory, features, labels, templates_per_step=len(TEMPLATES))
    sampled = _train(tower, lora_factory, features, labels, templates_per_step=1)
    assert same.losses == every.losses
    assert sampled.losses != every.losses and all(torch.isfinite(torch.tensor(sampled.losses)))


def test_evaluation_encodes_only_the_classes_it_composes(mtil_run, monkeypatch, tmp_path):
    """Trained classes are never re-encoded. By displacement (the default) evaluation runs the text tower not
    once; in parameter space, after the first step it encodes the later task's prompts once (LoRA experts: each
    class's templates), and after the last step, with every class trained, not at all."""
    root, _ = mtil_run
    params = parse_params(MINI)
    parameter = params.model_copy(update={"composition": params.composition.model_copy(update={"space": "parameter"})})
    encoded = []
    original = TextTower.encode

    def counting(self, tokens, *args, **kwargs):
        encoded.append(tokens.shape[0])
        return original(self, tokens, *args, **kwargs)

    monkeypatch.setattr(TextTower, "encode", counting)
    later_prompts = MINI["datasets"]["b"]["classes"] * len(MINI["templates"])
    assert params.composition.space == "displacement"
    for settings, step, expected in (
        (params, "b", []),
        (params, "a", []),
        (parameter, "b", []),
        (parameter, "a", [later_prompts]),
    ):
        encoded.clear()
        evaluate(
            settings,
            step,
            root / MODEL,
            root / DATA / "features",
            root / DATA / "experts",
            root / DATA / "hub" / f"{step}.parquet",
            tmp_path / f"{settings.composition.space}-{step}.parquet",
            tmp_path / f"unseen-{step}.parquet",
        )
        assert encoded == expected, (settings.composition.space, step)
    assert (tmp_path / "displacement-a.parquet").read_bytes() == (root / DATA / "eval" / "a.parquet").read_bytes()


def test_trained_prototypes_are_stored_with_the_experts_and_checked(mtil_run, context_factory, tmp_path):
    root, _ = mtil_run
    params = parse_params(MINI)
    experts, names, _, prototypes = load_experts(root / DATA / "experts" / "a" / "split-1.safetensors")
    clip = load_frozen_clip(params, root / MODEL)
    factory = ExpertFactory(TextTower(clip.model, clip.tokenizer), params.expert, params.templates)
    assert prototypes is not None
    assert torch.equal(prototypes, expert_prototypes(factory.tower, factory.prompts(names), experts))
    with pytest.raises(ValueError, match=r"prototypes of shape \[2, 4\] for 1 experts"):
        save_experts(
            tmp_path / "x.safetensors",
            context_factory.new(1, torch.Generator()),
            ["a"],
            "B",
            prototypes=torch.zeros(2, 4),
        )
    path = tmp_path / "old.safetensors"
    save_experts(path, context_factory.new(2, torch.Generator()), ["a b", "c d"], "B", {"offsets": [0.0, 0.0]})
    with pytest.raises(ExpertFileError, match="old.safetensors: stores no prototypes"):
        read_task_experts(path, ["a b", "c d"], "t", "B")
