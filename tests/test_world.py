import pytest
import torch

from moder.params import SHAPES, DomainParams
from moder.world import World, class_splits, dataset_classes, outlined_shapes, render, seed_for

COLOURS = {"red": (0.9, 0.15, 0.15), "green": (0.2, 0.75, 0.25), "blue": (0.15, 0.3, 0.95)}
WORLD = World(COLOURS, ("circle", "square", "star"), 16, seed=0)


def _render(domain=None, name="d", labels=None, seed=1):
    domain = DomainParams() if domain is None else domain
    labels = torch.arange(9).repeat_interleave(4) if labels is None else labels
    return render(WORLD, domain, name, labels, torch.Generator().manual_seed(seed))


def test_rendering_is_deterministic_from_the_seed_and_varies_with_it():
    assert torch.equal(_render(), _render())
    assert not torch.equal(_render(), _render(seed=2))
    images = _render()
    assert images.shape == (36, 3, 16, 16) and images.min() >= 0 and images.max() <= 1


def test_object_colour_is_the_class_colour():
    domain = DomainParams(background=(0.0, 0.0), noise=0.0)
    images = _render(domain)
    colour_of, _ = WORLD.attributes(torch.arange(9).repeat_interleave(4))
    for image, colour in zip(images, colour_of, strict=True):
        pixels = image.reshape(3, -1)
        bright = pixels[:, pixels.sum(0) > 0.6]  # object pixels; the background is black
        expected = torch.tensor(list(COLOURS.values())[int(colour)])
        assert (bright.median(1).values - expected).abs().max() < 0.15  # per-image jitter has std 0.04


def test_tint_moves_a_colour_the_same_way_in_every_class_that_has_it():
    clean = DomainParams(background=(0.0, 0.0), noise=0.0)
    tinted = DomainParams(background=(0.0, 0.0), noise=0.0, tint=0.3)
    labels = torch.tensor([0, 1, 2])  # red circle, red square, red star
    shift = []
    for label in labels:
        a, b = (_render(d, labels=label.repeat(8), seed=3).reshape(8, 3, -1) for d in (clean, tinted))
        mask = a.sum(1, keepdim=True) > 0.6
        shift.append(((b * mask).sum((0, 2)) - (a * mask).sum((0, 2))) / mask.sum())
    direction = WORLD.tint_directions()[0]
    for s in shift:
        assert torch.cosine_similarity(s, direction, dim=0) > 0.9


def test_outlined_shapes_are_a_fixed_fraction_drawn_per_domain():
    world = World(COLOURS, SHAPES, 16, seed=0)
    chosen = outlined_shapes(world, DomainParams(outline=0.5), "sketch")
    assert len(chosen) == 4 and chosen == outlined_shapes(world, DomainParams(outline=0.5), "sketch")
    assert outlined_shapes(world, DomainParams(), "sketch") == []
    # an outlined shape covers fewer pixels than the filled one
    labels = torch.tensor([0]).repeat(8)
    filled = _render(DomainParams(background=(0, 0), noise=0), labels=labels)
    hollow = render(
        World(COLOURS, ("circle", "square", "star"), 16, 0),
        DomainParams(background=(0, 0), noise=0, outline=1.0),
        "d",
        labels,
        torch.Generator().manual_seed(1),
    )
    assert (hollow.sum(1) > 0.6).sum() < 0.8 * (filled.sum(1) > 0.6).sum()


def test_dataset_classes_and_splits_are_balanced_disjoint_and_seeded():
    world = World(COLOURS, SHAPES, 16, seed=0)
    subset = dataset_classes(world, 10, "studio")
    assert len(subset) == len(set(subset.tolist())) == 10
    assert torch.equal(subset, dataset_classes(world, 10, "studio"))
    assert not torch.equal(subset, dataset_classes(world, 10, "sketch"))
    assert torch.equal(dataset_classes(world, None, "x"), torch.arange(24))
    # ranges of one order shared by every dataset: ranges that do not overlap share no class
    ranges = [dataset_classes(world, 8, name, offset) for name, offset in (("a", 0), ("b", 8), ("c", 16))]
    assert sorted(torch.cat(ranges).tolist()) == list(range(24))
    assert torch.equal(dataset_classes(world, 8, "other name", 8), ranges[1])  # the name plays no part
    assert not torch.equal(dataset_classes(World(COLOURS, SHAPES, 16, seed=1), 8, "b", 8), ranges[1])
    with pytest.raises(ValueError, match="cannot take 8 classes from position 20 of a world of 24"):
        dataset_classes(world, 8, "a", 20)
    parts = class_splits(24, 4, seed=0, dataset_name="paint")
    assert [len(p) for p in parts] == [6, 6, 6, 6]
    assert sorted(torch.cat(parts).tolist()) == list(range(24))
    assert [p.tolist() for p in parts] == [p.tolist() for p in class_splits(24, 4, 0, "paint")]
    with pytest.raises(ValueError, match="cannot split 3 classes into 4 tasks"):
        class_splits(3, 4, 0, "x")


def test_unknown_shape_and_seed_streams():
    with pytest.raises(ValueError, match="unknown shapes \\['blob'\\]"):
        World(COLOURS, ("circle", "blob"), 16, 0)
    assert seed_for(0, "a") != seed_for(0, "b") != seed_for(1, "a")
    assert seed_for(0, "a") == seed_for(0, "a")
