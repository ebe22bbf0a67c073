"""The mechanisms that keep composition from costing zero-shot ability: gating, smoothing of composed
prototypes, per-task calibration, the textual alignment term and dataset-specific shifts."""

import pytest
import torch
import torch.nn.functional as F
from conftest import CLASSES, TEMPLATES, evaluation_settings, random_lora, train_params

from moder.classifier import Classifier, HubSettings
from moder.compose import compose_prototypes
from moder.evaluation import calibration_offsets, compose_unseen
from moder.hub import ExpertHub, HubEntry
from moder.params import DomainParams, EvaluationSettings
from moder.prompts import zeroshot_prototypes
from moder.train import _loss, class_centroids
from moder.world import World, render

UNSEEN = ["orange circle", "pink star", "cyan cross"]


def _settings(**changes) -> EvaluationSettings:
    base = dict(k=3, temperature=0.3, null_score=None, gate=None, alpha=1.0, alpha_unseen=1.0, calibrate="mean")
    return evaluation_settings(**{**base, "space": "parameter", **changes})


@pytest.fixture(scope="module")
def hub(clip, tower, lora_factory):
    """Two steps: classes 0-2 (offsets 0, 0.01, 0.02: task mean 0.01) and 3-4 (0.03, 0.04: mean 0.035)."""
    hub = ExpertHub(clip.identity.to_json())
    keys = zeroshot_prototypes(tower, CLASSES, TEMPLATES)
    experts = random_lora(lora_factory, len(CLASSES), seed=3)
    for step, rows, offsets in ((1, [0, 1, 2], (0.0, 0.01, 0.02)), (2, [3, 4], (0.03, 0.04))):
        entry = HubEntry(step, f"task{step}", "data", f"data/split-{step}.safetensors", offsets)
        hub.append(step, [CLASSES[r] for r in rows], keys[rows], experts.select(torch.tensor(rows)), entry)
    return hub


def _unseen(tower, lora_factory, hub, **changes):
    zeroshot = zeroshot_prototypes(tower, UNSEEN, TEMPLATES)
    return zeroshot, compose_unseen(lora_factory, lora_factory.prompts(UNSEEN), hub, zeroshot, _settings(**changes))


def test_a_gate_that_always_opens_is_plain_composition(tower, lora_factory, hub):
    zeroshot, composed = _unseen(tower, lora_factory, hub, gate=-1.0)
    retrieval = hub.query(zeroshot, 3, 0.3)
    plain = compose_prototypes(
        tower,
        lora_factory.prompts(UNSEEN),
        hub.experts,
        lora_factory.null(),
        retrieval.indices,
        retrieval.weights,
        "parameter",
    )
    assert composed.opened.all()
    assert torch.equal(composed.prototypes, plain)
    assert torch.equal(_unseen(tower, lora_factory, hub)[1].prototypes, plain)  # no gate: the same


def test_a_gate_that_never_opens_is_exactly_zero_shot(tower, lora_factory, hub):
    zeroshot, composed = _unseen(tower, lora_factory, hub, gate=1.0)
    assert not composed.opened.any()
    assert torch.equal(composed.prototypes, zeroshot)


def test_the_gate_opens_where_the_closest_hub_key_is_similar_enough(tower, lora_factory, hub):
    zeroshot, everything = _unseen(tower, lora_factory, hub, gate=-1.0)
    best = (F.normalize(zeroshot, dim=-1) @ hub.keys.T).max(dim=1).values
    threshold = best.median().item()
    _, gated = _unseen(tower, lora_factory, hub, gate=threshold)
    assert gated.opened.tolist() == (best >= threshold).tolist() == [bool(v) for v in best >= threshold]
    assert torch.allclose(gated.best_similarity, best, atol=1e-6)
    for row, opened in enumerate(gated.opened.tolist()):
        if opened:  # encoded in a smaller batch than `everything`'s: equal up to float reassociation
            assert torch.allclose(gated.prototypes[row], everything.prototypes[row], atol=1e-6, rtol=0)
        else:
            assert torch.equal(gated.prototypes[row], zeroshot[row])


def test_alpha_unseen_moves_composed_prototypes_toward_zero_shot(tower, lora_factory, hub):
    zeroshot, composed = _unseen(tower, lora_factory, hub)
    assert torch.equal(_unseen(tower, lora_factory, hub, alpha_unseen=0.0)[1].prototypes, zeroshot)
    half = _unseen(tower, lora_factory, hub, alpha_unseen=0.5)[1].prototypes
    assert torch.allclose(half, F.normalize(0.5 * composed.prototypes + 0.5 * zeroshot, dim=-1), atol=1e-6)


def test_classifier_composes_and_calibrates_as_evaluation_does(clip, tower, lora_factory, hub):
    names = ["blue star", "orange circle", "purple hexagon", "pink star"]  # trained: hub rows 2 (step 1) and 4 (step 2)
    by_task = torch.tensor([-0.01, -0.035])
    for calibrate, bias in (("task", by_task), ("mean", torch.full((2,), -0.02)), ("none", torch.zeros(2))):
        settings = _settings(calibrate=calibrate, gate=0.5, alpha_unseen=0.5)
        head = Classifier(clip, hub, HubSettings(lora_factory.spec, settings, TEMPLATES)).head(names)
        assert torch.allclose(head.bias[[0, 2]], bias, atol=1e-7), calibrate
        assert torch.equal(head.bias[[1, 3]], torch.zeros(2))
        zeroshot = zeroshot_prototypes(tower, ["orange circle", "pink star"], TEMPLATES)
        composed = compose_unseen(
            lora_factory, lora_factory.prompts(["orange circle", "pink star"]), hub, zeroshot, settings
        )
        assert torch.allclose(head.weights.T[[1, 3]], composed.prototypes, atol=1e-6)


def test_alignment_term_is_one_minus_cosine_to_each_class_image_centroid():
    generator = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(12, 8, generator=generator), dim=-1)
    labels = torch.tensor([0, 1, 2] * 4)
    prototypes = F.normalize(torch.randn(3, 8, generator=generator), dim=-1)
    centroids = class_centroids(features, labels, 3)
    for c in range(3):
        assert torch.allclose(centroids[c], F.normalize(features[labels == c].mean(0), dim=0), atol=1e-6)
    config = train_params(epochs=1, batch_size=4, lr=1e-3, logit_scale=10.0, align=0.7, anchor_earlier=0.0)
    expected = (
        F.cross_entropy(10.0 * features @ prototypes.T, labels) + 0.7 * (1 - (prototypes * centroids).sum(-1)).mean()
    )
    assert torch.allclose(_loss(features, labels, config, None, None, centroids, None, prototypes), expected)
    plain = F.cross_entropy(10.0 * features @ prototypes.T, labels)
    assert torch.equal(_loss(features, labels, config, None, None, None, None, prototypes), plain)


def test_anchor_term_classifies_earlier_centroids_among_new_and_stored_prototypes():
    generator = torch.Generator().manual_seed(1)
    features, labels = F.normalize(torch.randn(6, 8, generator=generator), dim=-1), torch.tensor([0, 1, 0, 1, 0, 1])
    prototypes = F.normalize(torch.randn(2, 8, generator=generator), dim=-1)
    negatives = F.normalize(torch.randn(3, 8, generator=generator), dim=-1)  # stored prototypes of 3 earlier classes
    anchors = (F.normalize(torch.randn(2, 8, generator=generator), dim=-1), torch.tensor([2, 0]))
    config = train_params(epochs=1, batch_size=4, lr=1e-3, logit_scale=10.0, align=0.0, anchor_earlier=0.5)
    classifier = torch.cat([prototypes, negatives])
    expected = F.cross_entropy(10.0 * features @ classifier.T, labels) + 0.5 * F.cross_entropy(
        10.0 * anchors[0] @ classifier.T, torch.tensor([4, 2])
    )
    assert torch.allclose(_loss(features, labels, config, None, negatives, None, anchors, prototypes), expected)


def test_own_tint_is_a_shift_no_other_domain_shares():
    world = World({"red": (0.9, 0.1, 0.1), "blue": (0.1, 0.2, 0.9)}, ("circle",), 16, seed=4)
    labels = torch.tensor([0, 1])

    def images(domain: DomainParams, name: str) -> torch.Tensor:
        return render(world, domain, name, labels, torch.Generator().manual_seed(0))

    shared, own = DomainParams(tint=0.5, noise=0.0), DomainParams(tint=0.5, noise=0.0, own_tint=True)
    assert torch.equal(images(shared, "a"), images(shared, "b"))  # the world's directions
    assert not torch.equal(images(own, "a"), images(own, "b"))
    assert not torch.equal(images(own, "a"), images(shared, "a"))
    assert torch.equal(world.tint_directions("a"), world.tint_directions("a"))
    assert torch.allclose(world.tint_directions("a").norm(dim=-1), torch.ones(2))


def test_calibration_offsets_per_mode(hub):
    # hub rows 0-2: step 1 (offsets 0, 0.01, 0.02); rows 3-4: step 2 (0.03, 0.04)
    assert calibration_offsets("task", hub, [1, 2, 3]) == pytest.approx([0.01, 0.01, 0.035])
    assert calibration_offsets("mean", hub, [0, 4]) == pytest.approx([0.02, 0.02])
    assert calibration_offsets("none", hub, [0, 1]) == [0.0, 0.0] and calibration_offsets("mean", hub, []) == []


def _hub_with_own(clip, tower, lora_factory, scale: float) -> ExpertHub:
    """Five classes in two steps whose own prototypes are their zero-shot keys moved by `scale` * noise."""
    built = ExpertHub(clip.identity.to_json())
    keys = zeroshot_prototypes(tower, CLASSES, TEMPLATES)
    shift = scale * torch.randn(keys.shape, generator=torch.Generator().manual_seed(4))
    experts = random_lora(lora_factory, len(CLASSES), seed=3)
    own = F.normalize(keys + shift, dim=-1)
    for step, rows in ((1, [0, 1, 2]), (2, [3, 4])):
        entry = HubEntry(step, f"task{step}", "data", f"data/split-{step}.safetensors")
        built.append(step, [CLASSES[r] for r in rows], keys[rows], experts.select(torch.tensor(rows)), entry, own[rows])
    return built


def test_displacement_moves_zero_shot_by_the_retrieved_classes_weighted_moves(clip, tower, lora_factory):
    built = _hub_with_own(clip, tower, lora_factory, 0.3)
    zeroshot, composed = _unseen(tower, lora_factory, built, space="displacement")
    retrieval = built.query(zeroshot, 3, 0.3)
    moves = built.moves()  # own minus key, row by row
    expected = torch.stack(
        [
            F.normalize(
                zeroshot[q]
                + sum(w * moves[r] for r, w in zip(retrieval.indices[q], retrieval.weights[q], strict=True)),
                dim=-1,
            )
            for q in range(len(UNSEEN))
        ]
    )
    torch.testing.assert_close(composed.prototypes, expected, atol=1e-6, rtol=0)
    # own prototypes equal to the keys move nothing: every class keeps its zero-shot prototype
    still = _hub_with_own(clip, tower, lora_factory, 0.0)
    torch.testing.assert_close(_unseen(tower, lora_factory, still, space="displacement")[1].prototypes, zeroshot)
    # alpha_unseen = 0 is zero-shot exactly, and the null expert moves nothing
    assert torch.equal(
        _unseen(tower, lora_factory, built, space="displacement", alpha_unseen=0.0)[1].prototypes, zeroshot
    )
    only_null = _unseen(tower, lora_factory, built, space="displacement", null_score=1.0, k=1)[1]
    assert (only_null.retrieval.indices == -1).all()
    torch.testing.assert_close(only_null.prototypes, zeroshot)


def test_displacement_needs_the_hubs_own_prototypes(tower, lora_factory, hub):
    with pytest.raises(ValueError, match="no own prototypes"):
        _unseen(tower, lora_factory, hub, space="displacement")
