import json

import pytest
import torch
from conftest import random_lora

from moder.experts import ContextExperts
from moder.hub import NULL_EXPERT, ExpertHub


def _keys(*vectors):
    return torch.nn.functional.normalize(torch.tensor(vectors, dtype=torch.float), dim=-1)


def _context(n, dim=3):
    return ContextExperts(torch.arange(n * 2 * dim, dtype=torch.float).view(n, 2, dim))


def test_retrieval_order_and_softmax_weights_on_hand_made_keys():
    hub = ExpertHub("backbone")
    hub.append(1, ["a", "b", "c"], _keys([1, 0, 0], [0, 1, 0], [1, 1, 0]), _context(3))
    result = hub.query(torch.tensor([[1.0, 0.2, 0.0]]), k=2, temperature=0.5)
    query = torch.nn.functional.normalize(torch.tensor([1.0, 0.2, 0.0]), dim=0)
    sims = torch.stack([query[0], query[1], (query[0] + query[1]) / 2**0.5])
    assert result.indices.tolist() == [[0, 2]]
    assert torch.allclose(result.scores[0], sims[[0, 2]])
    assert torch.allclose(result.weights[0], torch.softmax(sims[[0, 2]] / 0.5, dim=0))
    assert torch.allclose(result.weights.sum(dim=1), torch.ones(1))


def test_null_expert_competes_with_its_fixed_score():
    hub = ExpertHub("backbone")
    hub.append(1, ["a", "b"], _keys([1, 0, 0], [0, 1, 0]), _context(2))
    near, far = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 1.0]])
    assert hub.query(near, k=1, temperature=0.1, null_score=0.5).indices.tolist() == [[0]]
    far_result = hub.query(far, k=2, temperature=0.1, null_score=0.5)
    assert far_result.indices[0, 0].item() == NULL_EXPERT
    assert far_result.weights[0, 0] > 0.99
    assert hub.query(far, k=2, temperature=0.1).indices[0].tolist() in ([0, 1], [1, 0])


def test_empty_hub_serves_only_the_null_expert():
    hub = ExpertHub("backbone")
    assert hub.query(torch.ones(1, 3), k=3, temperature=0.1, null_score=0.0).indices.tolist() == [[NULL_EXPERT]]
    with pytest.raises(ValueError, match="hub is empty"):
        hub.query(torch.ones(1, 3), k=3, temperature=0.1)


def test_hub_grows_and_round_trips(tmp_path, lora_factory):
    hub = ExpertHub('{"architecture": "x"}')
    keys = torch.nn.functional.normalize(torch.randn(5, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    hub.append(1, ["a", "b", "c"], keys[:3], random_lora(lora_factory, 3, seed=1))
    hub.append(2, ["d", "e"], keys[3:], random_lora(lora_factory, 2, seed=2))
    with pytest.raises(ValueError, match="step 2 is already"):
        hub.append(2, ["f"], keys[:1], random_lora(lora_factory, 1))
    hub.save(tmp_path / "hub.safetensors", tmp_path / "hub.parquet")
    loaded = ExpertHub.load(tmp_path / "hub.safetensors", tmp_path / "hub.parquet", identity=hub.identity)
    assert loaded.class_names == ["a", "b", "c", "d", "e"] and loaded.steps == [1, 1, 1, 2, 2]
    for name, tensor in hub.experts.tensors().items():
        assert torch.equal(loaded.experts.tensors()[name], tensor)
    queries = torch.randn(4, 32, generator=torch.Generator().manual_seed(3))
    for kwargs in ({"k": 3, "temperature": 0.05}, {"k": 2, "temperature": 1.0, "null_score": 0.1}):
        a, b = hub.query(queries, **kwargs), loaded.query(queries, **kwargs)
        assert torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub.parquet", "hub.safetensors"]  # no temp files left


def test_hub_refuses_another_backbone_and_mismatched_sizes(tmp_path):
    hub = ExpertHub(json.dumps({"architecture": "one"}))
    with pytest.raises(ValueError, match="2 classes, 3 keys and 3 experts"):
        hub.append(1, ["a", "b"], torch.randn(3, 3), _context(3))
    hub.append(1, ["a"], torch.randn(1, 3), _context(1))
    hub.save(tmp_path / "h.safetensors", tmp_path / "h.parquet")
    with pytest.raises(ValueError, match="built on backbone"):
        ExpertHub.load(tmp_path / "h.safetensors", tmp_path / "h.parquet", identity="other")
