import logging

import open_clip
import pytest
import torch
from conftest import random_lora
from safetensors.torch import save_file

from moder.clip import ModelIdentity, ModelLoadError, load_clip
from moder.experts import load_experts, save_experts
from moder.text import TextTower


def test_project_configs_are_registered_with_open_clip():
    assert {"moder-micro-clip", "moder-tiny-clip"} <= set(open_clip.list_models())
    assert open_clip.get_model_config("moder-tiny-clip")["text_cfg"]["width"] == 128


def test_random_init_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b = load_clip("moder-micro-clip", seed=5), load_clip("moder-micro-clip", seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.model.token_embedding.weight, b.model.token_embedding.weight)
    assert a.identity == b.identity and a.identity.weights == "random:seed=5"


def test_local_checkpoint_loads_and_tags_identity_with_its_digest(tmp_path, clip):
    path = tmp_path / "micro.safetensors"
    save_file({k: v.contiguous() for k, v in clip.model.state_dict().items()}, str(path))
    loaded = load_clip("moder-micro-clip", checkpoint=path, seed=99)
    tokens = loaded.tokenizer(["a photo of a red star."])
    assert torch.equal(
        TextTower(loaded.model, loaded.tokenizer).encode(tokens), TextTower(clip.model, clip.tokenizer).encode(tokens)
    )
    assert loaded.identity.weights.startswith("file:") and loaded.identity.embed_dim == 32
    assert ModelIdentity.from_json(loaded.identity.to_json()) == loaded.identity


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"architecture": "ViT-Q-99"}, "unknown CLIP architecture 'ViT-Q-99'"),
        (
            {"architecture": "moder-micro-clip", "checkpoint": "/nowhere/w.safetensors"},
            "CLIP checkpoint not found: /nowhere/w.safetensors",
        ),
        (
            {"architecture": "ViT-B-16", "pretrained": "no-such-tag"},
            "unknown pretrained tag 'no-such-tag' for ViT-B-16",
        ),
    ],
)
def test_load_errors_say_what_was_looked_for(kwargs, message):
    with pytest.raises(ModelLoadError, match=message):
        load_clip(**kwargs)


def test_wrong_checkpoint_is_reported_with_its_path(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"unrelated": torch.zeros(2)}, str(path))
    with pytest.raises(ModelLoadError, match=f"could not load CLIP checkpoint {path}"):
        load_clip("moder-micro-clip", checkpoint=path)


def test_experts_round_trip_with_metadata(tmp_path, lora_factory, context_factory):
    for experts in (random_lora(lora_factory, 2), context_factory.new(2, torch.Generator())):
        path = tmp_path / f"{experts.kind}.safetensors"
        save_experts(path, experts, ["red star", "blue circle"], identity="B", extra={"step": 3})
        loaded, names, extra, _ = load_experts(path, identity="B")
        assert names == ["red star", "blue circle"] and extra == {"step": 3}
        assert loaded.describe() == experts.describe()
        for name, tensor in experts.tensors().items():
            assert torch.equal(loaded.tensors()[name], tensor)
        with pytest.raises(ValueError, match="trained on backbone B, not C"):
            load_experts(path, identity="C")
    with pytest.raises(ValueError, match="2 class names for 1 experts"):
        save_experts(tmp_path / "x.safetensors", context_factory.new(1, torch.Generator()), ["a", "b"], identity="B")


def test_the_same_experts_always_give_the_same_bytes(tmp_path, lora_factory):
    """DVC hashes files: recomputing an identical result must not look like a new one."""
    experts = random_lora(lora_factory, 2)
    written = set()
    for _ in range(8):
        save_experts(tmp_path / "e.safetensors", experts, ["a", "b"], identity="B", extra={"task": "t", "dataset": "d"})
        written.add((tmp_path / "e.safetensors").read_bytes())
    assert len(written) == 1


def test_offline_pretrained_tag_error_says_how_to_use_a_local_copy(tmp_path):
    import os
    import subprocess
    import sys

    code = (
        f"from moder.clip import load_clip\nload_clip('ViT-B-16', pretrained='openai', cache_dir={str(tmp_path)!r})\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0
    assert f"weights ViT-B-16/openai are not in cache_dir={tmp_path} and HF_HUB_OFFLINE is set" in result.stderr
    assert "set model.checkpoint in params.yaml" in result.stderr


def test_a_requested_random_init_is_not_reported_as_missing_weights(caplog):
    with caplog.at_level(logging.WARNING):
        load_clip("moder-micro-clip", seed=3)
    assert not [r.getMessage() for r in caplog.records if "pretrained weights" in r.getMessage()]
    logging.warning("No pretrained weights loaded for model 'x'")  # other callers' warnings pass through
    assert "No pretrained weights loaded for model 'x'" in caplog.text


def test_offline_without_cached_weights_fails_at_once_naming_the_fix(monkeypatch, tmp_path):
    """No retry storm: the reachability check answers before open_clip starts downloading."""
    import socket

    import open_clip

    from moder import clip as clip_module

    def unreachable(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    def never(*args, **kwargs):
        raise AssertionError("open_clip was asked to download")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(open_clip, "create_model_and_transforms", never)
    with pytest.raises(ModelLoadError) as error:
        load_clip("ViT-B-32", pretrained="openai", cache_dir=tmp_path)
    message = str(error.value)
    assert f"not in cache_dir={tmp_path}" in message and "huggingface.co cannot be reached" in message
    assert "model.checkpoint" in message and "\n" not in message
    # weights already in the cache: no network check, open_clip loads them
    monkeypatch.setattr(clip_module, "try_to_load_from_cache", lambda *a, **k: str(tmp_path / "weights"))

    def stub(*args, **kwargs):
        raise RuntimeError("stub loader reached")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", stub)
    with pytest.raises(ModelLoadError, match="stub loader reached"):
        load_clip("ViT-B-32", pretrained="openai", cache_dir=tmp_path)
