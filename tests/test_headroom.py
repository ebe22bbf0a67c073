"""The headroom decomposition's two prototype variants (scripts/headroom.py) on hand-made hubs."""

import torch
from conftest import CLASSES, random_lora

from moder.compose import expert_prototypes
from moder.experts import LoraExperts
from moder.hub import ExpertHub, HubEntry
from moder.prompts import zeroshot_prototypes
from scripts.headroom import hindsight_prototypes, shared_prototypes


def _hub(clip, tower, lora_factory) -> ExpertHub:
    """Two classes of dataset d1 (step 1) and two of d2 (step 2), each with a random expert."""
    experts = random_lora(lora_factory, 4, seed=3)
    hub = ExpertHub(clip.identity.to_json())
    for step, dataset, rows in ((1, "d1", [0, 1]), (2, "d2", [2, 3])):
        names = [CLASSES[r] for r in rows]
        entry = HubEntry(step, dataset, dataset, f"{dataset}/split-1.safetensors")
        hub.append(
            step,
            names,
            zeroshot_prototypes(tower, names, lora_factory.templates),
            experts.select(torch.tensor(rows)),
            entry,
        )
    return hub


def test_shared_part_is_the_equal_weight_mean_of_the_datasets_experts_and_none_for_a_dataset_not_seen(
    clip, tower, lora_factory
):
    hub = _hub(clip, tower, lora_factory)
    prompts = lora_factory.prompts(["orange ring", "cyan cross"])
    bank = hub.experts
    # the mean of d2's two deltas, (B2 A2 + B3 A2) / 2, built by hand as one rank-2r LoRA: [B2 B3] / 2 @ [A2; A3]
    mean = LoraExperts(
        {t: torch.cat([bank.a[t][2], bank.a[t][3]])[None] for t in bank.a},
        {t: torch.cat([bank.b[t][2], bank.b[t][3]], dim=1)[None] / 2 for t in bank.b},
        bank.scaling,
    )
    expected = expert_prototypes(tower, prompts, mean.select(torch.tensor([0, 0])))
    torch.testing.assert_close(shared_prototypes(lora_factory, prompts, hub, "d2"), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(shared_prototypes(lora_factory, prompts, hub, "d1"), expected, atol=1e-3)
    assert shared_prototypes(lora_factory, prompts, hub, "d3") is None


def test_hindsight_with_k_one_picks_the_hub_expert_whose_prototype_is_the_class_own(clip, tower, lora_factory):
    hub = _hub(clip, tower, lora_factory)
    names = ["orange ring", "cyan cross"]
    prompts = lora_factory.prompts(names)
    zeroshot = zeroshot_prototypes(tower, names, lora_factory.templates)
    # each query's "own" prototype is what hub row 3 (query 0) and hub row 1 (query 1) make of it
    own = torch.stack(
        [
            expert_prototypes(tower, prompts, hub.experts.select(torch.tensor([row, row])))[query]
            for query, row in ((0, 3), (1, 1))
        ]
    )
    picked = hindsight_prototypes(lora_factory, prompts, hub, own, zeroshot, k=1, temperature=1.0)
    torch.testing.assert_close(picked, own, atol=1e-5, rtol=0)
