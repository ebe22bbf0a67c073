"""Feature and prototype tables as Parquet, tagged with the model that made them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from moder.errors import UserError
from moder.io import atomic_path

UNIT_TOLERANCE = 1e-3  # how far a stored feature's norm may be from 1 (float32 rounding is ~1e-7)
_MODEL_KEY, _DATASET_KEY, _CLASSES_KEY = b"moder.model", b"moder.dataset", b"moder.classes"
_TEMPLATES_KEY = b"moder.templates"
_SHOTS_KEY = b"moder.shots"


class FeatureFileError(UserError, ValueError):
    """A feature file is missing, malformed or was made by another model; the message names the file."""


@dataclass(frozen=True)
class FeatureTable:
    """Rows of one dataset split (or one row per class for prototypes)."""

    vectors: Tensor  # [N, d] float32
    labels: Tensor  # [N] int64, indices into class_names
    class_names: list[str]
    dataset: str
    model: str  # ModelIdentity JSON of the producing model
    templates: tuple[str, ...] = ()  # prototype tables: the prompt templates they were encoded from
    # a few-shot training split (extract.shots): images kept per class, and their positions in the split's
    # full listing (moder/shots.py), so that anyone can check which images every method trained on
    shots: int | None = None
    kept: tuple[int, ...] = ()

    def select(self, classes: list[int]) -> tuple[Tensor, Tensor]:
        """The rows of `classes` only, labelled by position in `classes` (a task's slice of its dataset)."""
        own = torch.tensor(classes, dtype=torch.long)
        keep = torch.isin(self.labels, own)
        position = torch.full((len(self.class_names),), -1, dtype=torch.long)
        position[own] = torch.arange(len(own))
        return self.vectors[keep], position[self.labels[keep]]


def write_features(path: Path | str, table: FeatureTable) -> None:
    """One Parquet file, written atomically: `label` and a fixed-size float32 `feature` column.

    Non-finite vectors are refused (a damaged backbone or preprocessing makes them)."""
    if not bool(torch.isfinite(table.vectors).all()):
        raise FeatureFileError(
            f"refusing to write {path}: the {table.dataset} features have non-finite values "
            "(check the backbone checkpoint and its preprocessing)"
        )
    vectors = table.vectors.detach().cpu().float().contiguous().numpy()
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), vectors.shape[1])
    arrow = pa.table({"label": pa.array(table.labels.cpu().numpy().astype(np.int32)), "feature": column})
    arrow = arrow.replace_schema_metadata(
        {
            _MODEL_KEY: table.model.encode(),
            _DATASET_KEY: table.dataset.encode(),
            _CLASSES_KEY: json.dumps(table.class_names).encode(),
            **({_TEMPLATES_KEY: json.dumps(list(table.templates)).encode()} if table.templates else {}),
            **(
                {_SHOTS_KEY: json.dumps({"shots": table.shots, "kept": list(table.kept)}).encode()}
                if table.shots is not None
                else {}
            ),
        }
    )
    with atomic_path(path) as temporary:
        pq.write_table(arrow, temporary)


def read_features(path: Path | str, model: str | None = None, dataset: str | None = None) -> FeatureTable:
    """Read a table written by `write_features`; with `model` (and `dataset`), refuse one made by
    another model (or for another dataset). Damaged contents are refused naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FeatureFileError(f"feature file not found: {path}")
    try:
        arrow = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise FeatureFileError(f"{path}: not a readable Parquet file ({error})") from None
    metadata = arrow.schema.metadata or {}
    missing = [key.decode() for key in (_MODEL_KEY, _DATASET_KEY, _CLASSES_KEY) if key not in metadata]
    if missing or "feature" not in arrow.column_names or "label" not in arrow.column_names:
        raise FeatureFileError(
            f"{path}: not a MoDER feature file (missing {', '.join(missing) or 'feature/label columns'})"
        )
    producer = metadata[_MODEL_KEY].decode()
    if model is not None and producer != model:
        raise FeatureFileError(
            f"{path} was made by another model:\n  file:     {producer}\n  expected: {model}\n"
            "re-run its extract stage with the current model"
        )
    tagged = metadata[_DATASET_KEY].decode()
    if dataset is not None and tagged != dataset:
        raise FeatureFileError(f"{path} holds features of dataset {tagged!r}, not {dataset!r}")
    column = arrow.column("feature").combine_chunks()
    if not pa.types.is_fixed_size_list(column.type) or arrow.column("label").null_count or column.null_count:
        raise FeatureFileError(f"{path}: not a MoDER feature file (feature must be a fixed-size list, no nulls)")
    width = column.type.list_size
    vectors = np.asarray(column.values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, width)
    labels = arrow.column("label").to_numpy().astype(np.int64)
    try:
        class_names = json.loads(metadata[_CLASSES_KEY])
        templates = tuple(json.loads(metadata[_TEMPLATES_KEY])) if _TEMPLATES_KEY in metadata else ()
        draw = json.loads(metadata[_SHOTS_KEY]) if _SHOTS_KEY in metadata else {"shots": None, "kept": []}
        shots, kept = draw["shots"], tuple(int(i) for i in draw["kept"])
    except ValueError as error:
        raise FeatureFileError(f"{path}: its class list, templates or shots are not valid JSON ({error})") from None
    except (KeyError, TypeError) as error:
        raise FeatureFileError(f"{path}: its shots record is malformed ({error!r})") from None
    if not np.isfinite(vectors).all():
        raise FeatureFileError(
            f"{path}: {int((~np.isfinite(vectors)).any(1).sum())} feature rows have non-finite values"
        )
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    off = np.abs(norms - 1.0) > UNIT_TOLERANCE
    if off.any():  # finite values can still be damage: 3.4e38 is a float32, its row's norm is not 1
        raise FeatureFileError(
            f"{path}: {int(off.sum())} feature rows are not unit vectors (norms {norms[off].min():.3g} to "
            f"{norms[off].max():.3g}): every feature and prototype is written L2-normalised, so the file is damaged"
        )
    outside = labels[(labels < 0) | (labels >= len(class_names))]
    if outside.size:
        raise FeatureFileError(f"{path}: label {int(outside[0])} is outside its {len(class_names)} classes")
    return FeatureTable(
        torch.from_numpy(vectors.copy()),
        torch.from_numpy(labels),
        class_names,
        tagged,
        producer,
        templates,
        shots,
        kept,
    )


def read_prototypes(path: Path | str, model: str, dataset: str) -> FeatureTable:
    """A prototype table (`classes.parquet`): one row per class, in class order."""
    table = read_features(path, model, dataset)
    if not torch.equal(table.labels, torch.arange(len(table.class_names))):
        raise FeatureFileError(
            f"{path}: {len(table.labels)} prototype rows do not match its {len(table.class_names)} classes one to one"
        )
    return table
