import json

import pytest
import torch
from conftest import random_lora

from moder.experts import ContextExperts
from moder.hub import NULL_EXPERT, ExpertHub, HubEntry, HubFileError


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


def _saved_step(tmp_path, experts, names, dataset, step, identity):
    from moder.experts import save_experts
    from moder.hub import HubEntry

    path = tmp_path / "experts" / dataset / f"split-{step}.safetensors"
    save_experts(path, experts, names, identity, {"offsets": [0.25] * len(names)})
    return HubEntry(step, f"task{step}", dataset, f"{dataset}/split-{step}.safetensors", (0.25,) * len(names))


def test_hub_grows_and_round_trips_as_an_index_over_the_experts_files(tmp_path, lora_factory):
    identity = '{"architecture": "x"}'
    hub = ExpertHub(identity)
    keys = torch.nn.functional.normalize(torch.randn(5, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    first, second = random_lora(lora_factory, 3, seed=1), random_lora(lora_factory, 2, seed=2)
    hub.append(1, ["a", "b", "c"], keys[:3], first, _saved_step(tmp_path, first, ["a", "b", "c"], "d1", 1, identity))
    hub.append(2, ["d", "e"], keys[3:], second, _saved_step(tmp_path, second, ["d", "e"], "d2", 2, identity))
    with pytest.raises(ValueError, match="step 2 is already"):
        hub.append(2, ["f"], keys[:1], random_lora(lora_factory, 1))
    hub.save_index(tmp_path / "hub.parquet", tmp_path / "experts", {"k": 3})
    loaded = ExpertHub.load_index(tmp_path / "hub.parquet", tmp_path / "experts", identity=hub.identity)
    assert loaded.class_names == ["a", "b", "c", "d", "e"] and loaded.steps == [1, 1, 1, 2, 2]
    assert loaded.datasets == ["d1"] * 3 + ["d2"] * 2 and loaded.offsets == [0.25] * 5
    assert ExpertHub.read_index_metadata(tmp_path / "hub.parquet") == (identity, {"k": 3})
    assert torch.equal(loaded.keys, hub.keys)
    for name, tensor in hub.experts.tensors().items():
        assert torch.equal(loaded.experts.tensors()[name], tensor)
    queries = torch.randn(4, 32, generator=torch.Generator().manual_seed(3))
    for kwargs in ({"k": 3, "temperature": 0.05}, {"k": 2, "temperature": 1.0, "null_score": 0.1}):
        a, b = hub.query(queries, **kwargs), loaded.query(queries, **kwargs)
        assert torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights)
    # the index holds no expert tensor: it is far smaller than the experts it points at
    experts_bytes = sum(p.stat().st_size for p in (tmp_path / "experts").rglob("*.safetensors"))
    assert (tmp_path / "hub.parquet").stat().st_size < experts_bytes / 5


def test_hub_index_refuses_another_backbone_a_changed_experts_file_and_a_missing_index(tmp_path):
    hub = ExpertHub(json.dumps({"architecture": "one"}))
    with pytest.raises(ValueError, match="2 classes, 3 keys and 3 experts"):
        hub.append(1, ["a", "b"], torch.randn(3, 3), _context(3))
    experts = _context(1)
    hub.append(1, ["a"], torch.randn(1, 3), experts, _saved_step(tmp_path, experts, ["a"], "d", 1, hub.identity))
    hub.save_index(tmp_path / "h.parquet", tmp_path / "experts", {})
    with pytest.raises(HubFileError, match="built on backbone"):
        ExpertHub.load_index(tmp_path / "h.parquet", tmp_path / "experts", identity="other")
    _saved_step(tmp_path, ContextExperts(torch.ones(1, 2, 3)), ["a"], "d", 1, hub.identity)  # retrained
    with pytest.raises(
        HubFileError, match=r"points at .*split-1.safetensors, which has changed since the hub was built"
    ):
        ExpertHub.load_index(tmp_path / "h.parquet", tmp_path / "experts")
    with pytest.raises(HubFileError, match="hub index not found"):
        ExpertHub.load_index(tmp_path / "nowhere.parquet", tmp_path / "experts")


def test_a_loaded_hub_reads_each_classs_own_prototype_from_its_experts_file(tmp_path, lora_factory):
    from moder.experts import save_experts

    identity = '{"architecture": "x"}'
    generator = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(3, 32, generator=generator), dim=-1)
    own = torch.nn.functional.normalize(torch.randn(3, 32, generator=generator), dim=-1)
    experts = random_lora(lora_factory, 3, seed=1)
    save_experts(tmp_path / "experts/d/split-1.safetensors", experts, ["a", "b", "c"], identity, {}, prototypes=own)
    hub = ExpertHub(identity)
    hub.append(1, ["a", "b", "c"], keys, experts, HubEntry(1, "t", "d", "d/split-1.safetensors"), own)
    hub.save_index(tmp_path / "hub.parquet", tmp_path / "experts", {})
    loaded = ExpertHub.load_index(tmp_path / "hub.parquet", tmp_path / "experts", identity)
    torch.testing.assert_close(loaded.moves(), own - hub.keys, atol=0, rtol=0)
    torch.testing.assert_close(hub.moves(), own - hub.keys, atol=0, rtol=0)  # keys are renormalised on append
    # an experts file without own prototypes (an older version's) is named, not a bare ValueError
    save_experts(tmp_path / "experts/e/split-2.safetensors", experts, ["a", "b", "c"], identity, {})
    hub.append(2, ["a", "b", "c"], keys, experts, HubEntry(2, "t", "e", "e/split-2.safetensors"))
    with pytest.raises(HubFileError, match=r"^experts files e/split-2.safetensors hold no own prototypes"):
        hub.moves()
