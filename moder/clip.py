"""Loading a frozen CLIP through open_clip, and the identity that tags everything it produces."""

from __future__ import annotations

import json
import logging
import math
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import huggingface_hub.constants
import open_clip
import open_clip.constants
import torch
from huggingface_hub import try_to_load_from_cache
from torch import Tensor

from moder.errors import UserError
from moder.io import file_digest
from moder.tensors import TensorFileError, load_metadata, save_tensors, verify_tensors

# The project's own tiny architectures live beside this module and are registered with
# open_clip's config registry, so `open_clip.create_model("moder-tiny-clip")` just works.
_CONFIG_DIR = Path(__file__).with_name("model_configs")
open_clip.add_model_config(_CONFIG_DIR)

PROJECT_MODELS = tuple(sorted(p.stem for p in _CONFIG_DIR.glob("*.json")))


# open_clip's CLIP / CustomTextCLIP (an nn.Module with encode_image, encode_text, logit_scale, ...):
# open_clip ships no type information, so its models are typed by this name only.
OpenClipModel = Any


class ModelLoadError(UserError, RuntimeError):
    """The requested CLIP could not be built or its weights could not be found."""


@dataclass(frozen=True)
class ModelIdentity:
    """What produced a feature or an expert; consumers refuse anything made by another model."""

    architecture: str
    weights: str
    embed_dim: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelIdentity:
        data = json.loads(text)
        data["mean"], data["std"] = tuple(data["mean"]), tuple(data["std"])
        return cls(**data)


@dataclass
class LoadedClip:
    model: OpenClipModel
    preprocess: Callable[[Any], Any]  # open_clip's image transform: PIL image -> tensor
    tokenizer: object
    identity: ModelIdentity
    quick_gelu: bool = False  # the activation the weights were trained with (OpenAI's CLIPs use QuickGELU)


def _check_device(device: str) -> None:
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"model.device is {device!r} but this machine has no CUDA device; set model.device: cpu")


def _saved_backbone(checkpoint: Path) -> dict:
    """What `save_backbone` recorded beside the weights ({} for any other checkpoint), checked."""
    if checkpoint.suffix != ".safetensors":
        return {}
    try:
        verify_tensors(checkpoint)
        saved = (load_metadata(checkpoint) or {}).get("backbone", {})
    except TensorFileError as error:
        raise ModelLoadError(f"could not read CLIP checkpoint: {error}") from None
    preprocess = saved.get("preprocess", {}) if isinstance(saved, dict) else None
    if not isinstance(preprocess, dict):
        raise ModelLoadError(f"{checkpoint}: its backbone metadata is not a JSON object")
    for key in ("mean", "std"):
        values = preprocess.get(key)
        if values is not None and (
            not isinstance(values, list)
            or len(values) != 3
            or not all(isinstance(v, (int, float)) and math.isfinite(v) and (key == "mean" or v > 0) for v in values)
        ):
            raise ModelLoadError(
                f"{checkpoint}: preprocessing {key} {values!r} is not 3 finite numbers{' > 0' if key == 'std' else ''}"
            )
    return saved


@contextmanager
def _quiet_random_init(intended: bool) -> Iterator[None]:
    """Without weights, open_clip warns that the model "initialized randomly": here that is the request
    (a seeded init, e.g. the tiny CLIP the backbone stage pre-trains), not a failure to report."""
    filter_ = _DropRandomInitWarning()
    if intended:
        logging.getLogger().addFilter(filter_)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(filter_)


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


def _check_weights_reachable(architecture: str, pretrained: str, cache_dir: Path | str | None) -> None:
    """Weights neither cached nor reachable: one error now. (open_clip would retry each file name for about
    a minute, printing a warning per try, before failing with the same cause.)"""
    cfg = open_clip.get_pretrained_cfg(architecture, pretrained)
    repo, url = cfg.get("hf_hub", "").strip("/"), cfg.get("url", "")
    cache = None if cache_dir is None else str(cache_dir)
    if repo:  # open_clip prefers the Hugging Face hub when a tag has both
        names = (open_clip.constants.HF_SAFE_WEIGHTS_NAME, open_clip.constants.HF_WEIGHTS_NAME)
        if any(isinstance(try_to_load_from_cache(repo, name, cache_dir=cache), str) for name in names):
            return
        host = urlparse(huggingface_hub.constants.ENDPOINT).hostname or "huggingface.co"
        if huggingface_hub.constants.HF_HUB_OFFLINE:
            raise _unreachable(architecture, pretrained, cache, "HF_HUB_OFFLINE is set")
    else:
        folder = Path(cache) if cache else Path.home() / ".cache" / "clip"
        if not url or (folder / Path(urlparse(url).path).name).is_file():
            return
        host = urlparse(url).hostname or url
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as error:
        raise _unreachable(architecture, pretrained, cache, f"{host} cannot be reached ({error})") from None


def _unreachable(architecture: str, pretrained: str, cache: str | None, reason: str) -> ModelLoadError:
    return ModelLoadError(
        f"weights {architecture}/{pretrained} are not in cache_dir={cache or 'the default cache'} and {reason}. "
        "Offline, download the weights elsewhere and set model.checkpoint in params.yaml to the local file, "
        "or set model.cache_dir to a directory that already holds them."
    )


def _weights_tag(architecture: str, pretrained: str | None, checkpoint: Path | None, seed: int) -> str:
    if checkpoint is not None:
        return f"file:{file_digest(Path(checkpoint))[:16]}"  # 16 hex digits name a checkpoint in identities
    if pretrained:
        return f"tag:{pretrained}"
    return f"random:seed={seed}"


def load_clip(
    architecture: str,
    pretrained: str | None = None,
    checkpoint: Path | str | None = None,
    cache_dir: Path | str | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> LoadedClip:
    """Build a frozen open_clip model in eval mode.

    Weights come from `checkpoint` (a local .safetensors/.pt file) when given, else from
    open_clip's `pretrained` tag (downloaded into `cache_dir`), else the model is randomly
    initialised from `seed` (the embedded benchmark pre-trains such a model itself).
    """
    if architecture not in open_clip.list_models():
        raise ModelLoadError(
            f"unknown CLIP architecture {architecture!r}; open_clip knows {len(open_clip.list_models())} "
            f"architectures, e.g. ViT-B-16, ViT-L-14, and this project's {', '.join(PROJECT_MODELS)}"
        )
    if checkpoint is not None and pretrained:
        raise ModelLoadError("give either a pretrained tag or a checkpoint path, not both")
    _check_device(device)
    source, saved = None, {}
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise ModelLoadError(
                f"CLIP checkpoint not found: {checkpoint} (model.checkpoint in params.yaml); "
                "point it at a local .safetensors or .pt file holding an open_clip state dict"
            )
        source, saved = str(checkpoint), _saved_backbone(checkpoint)
    elif pretrained:
        known = open_clip.list_pretrained_tags_by_model(architecture)
        if pretrained not in known:
            raise ModelLoadError(
                f"unknown pretrained tag {pretrained!r} for {architecture}; known tags: {', '.join(known) or 'none'}"
            )
        _check_weights_reachable(architecture, pretrained, cache_dir)
        source = pretrained
    # open_clip builds e.g. ViT-B-16 with GELU even for OpenAI's weights, which were trained with
    # QuickGELU (it only warns): follow the tag's own setting, as CLIP's published numbers do.
    quick_gelu = bool(
        saved.get("quick_gelu", False)
        or architecture.endswith("-quickgelu")
        or (pretrained and open_clip.get_pretrained_cfg(architecture, pretrained).get("quick_gelu", False))
    )
    preprocess_cfg = saved.get("preprocess", {})
    try:
        with torch.random.fork_rng(devices=[]), _quiet_random_init(source is None):
            torch.manual_seed(seed)  # seeds the random init without touching the caller's RNG
            model, _, preprocess = open_clip.create_model_and_transforms(
                architecture,
                pretrained=source,
                device=device,
                cache_dir=None if cache_dir is None else str(cache_dir),
                force_quick_gelu=quick_gelu,
                image_mean=preprocess_cfg.get("mean"),
                image_std=preprocess_cfg.get("std"),
                image_interpolation=preprocess_cfg.get("interpolation"),
                image_resize_mode=preprocess_cfg.get("resize_mode"),
            )
    except RuntimeError as error:
        if checkpoint is not None:
            raise ModelLoadError(f"could not load CLIP checkpoint {checkpoint} into {architecture}: {error}") from error
        raise ModelLoadError(
            f"could not fetch weights {architecture}/{pretrained} "
            f"(looked in cache_dir={cache_dir or 'the Hugging Face cache'}): "
            f"{error}. Offline, download the weights elsewhere and set model.checkpoint in params.yaml "
            "to the local file, or set model.cache_dir to a directory that already holds them."
        ) from error
    model.eval().requires_grad_(False)
    damaged = [
        name
        for name, tensor in model.state_dict().items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
    if damaged:
        raise ModelLoadError(
            f"CLIP weights from {source or 'random init'} have non-finite values in {damaged[0]}"
            f"{f' and {len(damaged) - 1} more tensors' if len(damaged) > 1 else ''}: the file is damaged"
        )
    cfg = open_clip.get_model_preprocess_cfg(model)
    image_size = cfg["size"]
    identity = ModelIdentity(
        architecture=architecture,
        weights=_weights_tag(architecture, pretrained, checkpoint, seed),
        embed_dim=int(open_clip.get_model_config(architecture)["embed_dim"]),
        image_size=int(image_size[0] if isinstance(image_size, (tuple, list)) else image_size),
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
    )
    return LoadedClip(model, preprocess, open_clip.get_tokenizer(architecture), identity, quick_gelu)


def text_layers(architecture: str) -> int:
    """How many blocks the architecture's text encoder has, from its config alone (no weights loaded)."""
    if architecture not in open_clip.list_models():
        raise ModelLoadError(f"unknown CLIP architecture {architecture!r} (model.architecture)")
    return int(open_clip.get_model_config(architecture)["text_cfg"]["layers"])


def save_backbone(clip: LoadedClip, path: Path | str, source: str) -> None:
    """The frozen CLIP as one safetensors file that `load_clip(architecture, checkpoint=path)` rebuilds
    exactly: the weights plus what the architecture name alone does not fix (the activation the
    weights were trained with, the preprocessing of their pretrained tag) and where they came from."""
    cfg = open_clip.get_model_preprocess_cfg(clip.model)
    preprocess = {key: cfg[key] for key in ("mean", "std", "interpolation", "resize_mode") if key in cfg}
    preprocess["mean"], preprocess["std"] = list(preprocess["mean"]), list(preprocess["std"])
    save_tensors(
        path,
        clip.model.state_dict(),
        {"backbone": {"source": source, "quick_gelu": clip.quick_gelu, "preprocess": preprocess}},
    )


def normalize_images(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """CLIP's input normalisation of images already at the model's resolution."""
    return (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
