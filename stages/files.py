"""The files stages exchange: the frozen backbone, feature tables, experts files and evaluation rows — where
each lives, and how it is read back and checked (a damaged or stale file's error names the stage that writes it)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from moder.clip import LoadedClip, ModelLoadError, load_clip
from moder.experts import ExpertFileError, Experts, load_experts
from moder.features import FeatureFileError, FeatureTable, read_features, read_prototypes
from moder.io import atomic_path
from moder.params import Params
from moder.tasks import TaskData, benchmark_tasks
from moder.train import TrainedTask


def load_frozen_clip(params: Params, path: Path) -> LoadedClip:
    """The frozen CLIP every stage after `backbone` uses, from the file that stage wrote."""
    if not path.is_file():
        raise ModelLoadError(f"backbone CLIP not found: {path} (run the backbone stage: dvc repro backbone)")
    return load_clip(
        params.model.architecture,
        checkpoint=path,
        cache_dir=params.model.cache_dir,
        device=params.model.device,
        seed=params.seed,
    )


def expert_file(dataset_experts: Path, split: int) -> Path:
    """Where train@<dataset> writes the experts of one split (task) of its dataset."""
    return dataset_experts / f"split-{split}.safetensors"


def read_task_experts(path: Path, class_names: list[str], task: str, identity: str) -> tuple[Experts, TrainedTask]:
    """A task's experts, and its prototypes (own experts) and offsets, checked against the task's classes."""
    experts, names, extra, prototypes = load_experts(path, identity)
    if names != class_names:
        raise ExpertFileError(f"{path} holds experts for other classes than task {task}")
    offsets = extra.get("offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != len(names)
        or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in offsets)
    ):
        raise ExpertFileError(f"{path}: its prototype offsets are not {len(names)} finite numbers")
    if prototypes is None:
        raise ExpertFileError(f"{path}: stores no prototypes (written by an older version)")
    return experts, TrainedTask(prototypes.float(), torch.tensor(offsets, dtype=torch.float32))


@contextmanager
def made_by(stage: str) -> Iterator[None]:
    """A damaged or stale input file: its error also names the stage that writes it."""
    try:
        yield
    except (FeatureFileError, ExpertFileError) as error:
        raise type(error)(f"{error} [written by {stage}: re-run it, e.g. dvc repro -f {stage}]") from None


def read_split(features: Path, dataset: str, split: str, identity: str) -> FeatureTable:
    """<features>/<dataset>/<split>.parquet, checked against the backbone and the dataset."""
    with made_by(f"extract@{dataset}"):
        return read_features(features / dataset / f"{split}.parquet", identity, dataset)


def read_classes(features: Path, dataset: str, identity: str) -> FeatureTable:
    """<features>/<dataset>/classes.parquet: the dataset's class names and zero-shot prototypes."""
    with made_by(f"extract@{dataset}"):
        return read_prototypes(features / dataset / "classes.parquet", identity, dataset)


def load_sequence(params: Params, features: Path, identity: str) -> list[TaskData]:
    """Every task's classes, zero-shot prototypes, templates and test features, from <features>/<dataset>/."""
    datasets = dict.fromkeys(task.dataset for task in params.tasks.values())
    classes = {d: read_classes(features, d, identity) for d in datasets}
    tests = {d: read_split(features, d, "test", identity) for d in datasets}
    sequence = []
    for task in benchmark_tasks(params, {d: len(table.class_names) for d, table in classes.items()}):
        table = classes[task.dataset]
        vectors, labels = tests[task.dataset].select(task.classes)
        sequence.append(
            TaskData(
                task,
                [table.class_names[i] for i in task.classes],
                table.vectors[task.classes],
                vectors,
                labels,
                table.templates,
            )
        )
    return sequence


def write_rows(path: Path, rows: list, row_type: type) -> None:
    """Dataclass rows as Parquet (the schema comes from the row type, so an empty table is still typed)."""
    names = [field.name for field in fields(row_type)]
    kinds = {"str": pa.string(), "float": pa.float64(), "int": pa.int64()}
    schema = pa.schema([(field.name, kinds[str(field.type)]) for field in fields(row_type)])
    table = pa.Table.from_pylist([{n: getattr(row, n) for n in names} for row in rows], schema=schema)
    with atomic_path(path) as temporary:
        pq.write_table(table, temporary)
