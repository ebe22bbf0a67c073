"""Atomic file writes: a write interrupted at any point leaves the old file (or none), never half of one."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


@contextmanager
def atomic_directory(path: Path | str) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield temporary
        if path.exists():
            shutil.rmtree(path)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary)


_METADATA_KEY = "moder"


def save_tensors(path: Path | str, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """safetensors, written atomically, with `metadata` as one sorted JSON string.

    One key because safetensors writes several metadata keys in a different order in every
    process, and DVC would then see a new file each time the same result is recomputed.
    """
    with atomic_path(path) as temporary:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(temporary),
                  metadata={_METADATA_KEY: json.dumps(metadata, sort_keys=True)})


def load_metadata(path: Path | str) -> dict[str, Any] | None:
    """The metadata written by `save_tensors` (None when the file has none), without reading the tensors."""
    with safe_open(str(path), framework="pt") as handle:
        raw = (handle.metadata() or {}).get(_METADATA_KEY)
    return None if raw is None else json.loads(raw)


def load_tensors(path: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Tensors and the metadata written by `save_tensors` (None when the file has none)."""
    return load_file(str(path)), load_metadata(path)
