"""A small end-to-end run of the core on generated features: two tasks, one trained, one composed."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moder.clip import load_clip
from moder.compose import compose_prototypes, seen_prototypes
from moder.factory import ExpertFactory
from moder.hub import ExpertHub
from moder.metrics import accuracy
from moder.params import Params
from moder.prompts import zeroshot_prototypes
from moder.synthetic import shifted_features
from moder.text import TextTower
from moder.train import train_experts


@dataclass(frozen=True)
class DemoResult:
    rows: list[tuple[str, float, float]]  # (task, zero-shot accuracy, MoDER accuracy)
    retrieved: list[tuple[str, list[tuple[str, float]]]]  # unseen class -> [(hub class, weight)]
    losses: list[float]


def run_demo(params: Params) -> DemoResult:
    """Task 1's experts are trained; task 2's classes are never trained and get composed prototypes."""
    generator = torch.Generator().manual_seed(params.seed)
    clip = load_clip(params.model.architecture, params.model.pretrained, params.model.checkpoint,
                     params.model.cache_dir, params.model.device, seed=params.seed)
    tower = TextTower(clip.model, clip.tokenizer)
    colours, shapes = params.demo.colours, params.demo.shapes
    names = [f"{colour} {shape}" for colour in colours for shape in shapes]
    groups = torch.arange(len(colours)).repeat_interleave(len(shapes))
    order = torch.randperm(len(names), generator=generator)
    tasks = [order[: len(names) // 2], order[len(names) // 2 :]]

    zeroshot = zeroshot_prototypes(tower, names, params.templates)
    features, labels = shifted_features(
        zeroshot, groups, params.demo.samples_per_class, params.demo.shift, params.demo.noise, generator
    )
    # The first half of each class's samples train, the rest test.
    half = params.demo.samples_per_class // 2
    is_train = (torch.arange(len(labels)) % params.demo.samples_per_class) < half

    def split(task, train: bool):
        mask = torch.isin(labels, task) & (is_train if train else ~is_train)
        remap = torch.full((len(names),), -1, dtype=torch.long)
        remap[task] = torch.arange(len(task))
        return features[mask], remap[labels[mask]]

    factory = ExpertFactory(tower, params.expert.spec(), params.templates)
    seen_names = [names[i] for i in tasks[0]]
    prompts = factory.prompts(seen_names)
    train_x, train_y = split(tasks[0], train=True)
    result = train_experts(tower, prompts, factory.new(len(seen_names), generator), train_x, train_y,
                           params.train.config(params.seed), zeroshot=zeroshot[tasks[0]], progress=True)
    hub = ExpertHub(clip.identity.to_json())
    hub.append(1, seen_names, zeroshot[tasks[0]], result.experts)

    unseen_names = [names[i] for i in tasks[1]]
    retrieval = hub.query(zeroshot[tasks[1]], params.retrieval.k, params.retrieval.temperature, params.retrieval.null_score)
    composed = compose_prototypes(tower, factory.prompts(unseen_names), hub.experts, factory.null(),
                                  retrieval.indices, retrieval.weights, params.composition.space)
    seen = seen_prototypes(tower, prompts, result.experts, zeroshot[tasks[0]], params.composition.alpha)

    rows = []
    for label, task, moder_prototypes in (("task 1 (trained)", tasks[0], seen), ("task 2 (unseen, composed)", tasks[1], composed)):
        test_x, test_y = split(task, train=False)
        rows.append((label, accuracy(test_x, test_y, zeroshot[task]), accuracy(test_x, test_y, moder_prototypes)))
    retrieved = [
        (name, [("null expert" if r < 0 else hub.class_names[r], float(w)) for r, w in zip(rows_, weights)])
        for name, rows_, weights in zip(unseen_names, retrieval.indices.tolist(), retrieval.weights.tolist())
    ]
    return DemoResult(rows, retrieved, result.losses)
