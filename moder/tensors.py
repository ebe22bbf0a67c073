"""Tensor files: safetensors written atomically with their metadata and a content digest, checked on load."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from moder.errors import UserError
from moder.io import OutputError, atomic_path


class TensorFileError(UserError, ValueError):
    """A safetensors file is unreadable, truncated or holds non-finite values; the message names it."""


_METADATA_KEY = "moder"
_DIGEST_KEY = "sha256"  # inside the metadata: of the rest of the metadata and every tensor


def _content_digest(tensors: Iterator[tuple[str, torch.Tensor]], metadata_text: str) -> str:
    """sha256 over the metadata and each tensor's name, dtype, shape and bytes, in name order: any
    changed byte of a file written by `save_tensors` (a value, an offset, a mean) is caught on load."""
    digest = hashlib.sha256(metadata_text.encode())
    for name, tensor in tensors:
        digest.update(f"\0{name}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_tensors(path: Path | str, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """safetensors, written atomically, with `metadata` and a content digest as one sorted JSON string.

    One key because safetensors writes several metadata keys in a different order in every
    process, and DVC would then see a new file each time the same result is recomputed.
    Non-finite values are refused: nothing downstream could make sense of them.
    """
    if _DIGEST_KEY in metadata:
        raise ValueError(f"metadata key {_DIGEST_KEY!r} is reserved for the content digest")
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise TensorFileError(f"refusing to write {path}: tensor {name} has non-finite values")
    try:
        text = json.dumps(metadata, sort_keys=True, allow_nan=False)
    except ValueError:
        raise TensorFileError(f"refusing to write {path}: its metadata holds non-finite numbers") from None
    digest = _content_digest(iter(sorted(tensors.items())), text)
    with atomic_path(path) as temporary:
        try:
            save_file(
                {k: v.detach().contiguous() for k, v in tensors.items()},
                str(temporary),
                metadata={_METADATA_KEY: json.dumps({**metadata, _DIGEST_KEY: digest}, sort_keys=True)},
            )
        except SafetensorError as error:  # safetensors reports a full disk as its own error, the OS's in its text
            raise OutputError(f"could not write {path}: {' '.join(str(error).split())}") from None


def _read_metadata(path: Path | str) -> tuple[dict[str, Any] | None, str | None]:
    """The metadata written by `save_tensors` and its recorded digest (None, None for other files)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(_METADATA_KEY)
    except (SafetensorError, OSError) as error:
        raise TensorFileError(f"{path}: not a readable safetensors file ({error})") from None
    if raw is None:
        return None, None
    try:
        metadata = json.loads(raw)
    except ValueError as error:
        raise TensorFileError(f"{path}: its metadata is not valid JSON ({error})") from None
    if not isinstance(metadata, dict):
        raise TensorFileError(f"{path}: its metadata is not a JSON object")
    return metadata, metadata.pop(_DIGEST_KEY, None)


def load_metadata(path: Path | str) -> dict[str, Any] | None:
    """The metadata written by `save_tensors` (None when the file has none), without reading the
    tensors (so unverified: `verify_tensors` checks the file against its digest)."""
    return _read_metadata(path)[0]


def _check_digest(
    path: Path | str, tensors: Iterator[tuple[str, torch.Tensor]], metadata: dict[str, Any] | None, recorded: str | None
) -> None:
    if metadata is None:
        return  # not written by save_tensors (e.g. a checkpoint from elsewhere): nothing to compare
    if recorded is None:
        raise TensorFileError(f"{path}: no content digest in its metadata (not written by this version, or edited)")
    if _content_digest(tensors, json.dumps(metadata, sort_keys=True, allow_nan=False)) != recorded:
        raise TensorFileError(f"{path}: its contents do not match their digest (the file was damaged or edited)")


def verify_tensors(path: Path | str) -> None:
    """Check a file written by `save_tensors` against its content digest, one tensor in memory at a time."""
    metadata, recorded = _read_metadata(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            _check_digest(path, ((k, handle.get_tensor(k)) for k in sorted(handle.keys())), metadata, recorded)
    except (SafetensorError, OSError) as error:
        raise TensorFileError(f"{path}: not a readable safetensors file ({error})") from None


def load_tensors(path: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Tensors and the metadata written by `save_tensors` (None when the file has none), checked
    against the content digest; every floating-point tensor must be finite."""
    metadata, recorded = _read_metadata(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise TensorFileError(f"{path}: not a readable safetensors file ({error})") from None
    _check_digest(path, iter(sorted(tensors.items())), metadata, recorded)
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise TensorFileError(f"{path}: tensor {name} has non-finite values (the file is damaged)")
    return tensors, metadata
