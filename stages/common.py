"""What every stage shares: its command line, loading the backbone, and turning errors into one clear line."""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from moder.benchmark import Task, TaskData, make_task
from moder.clip import LoadedClip, ModelLoadError, load_clip
from moder.datasets import DatasetFormatError, DatasetNotFound
from moder.experts import ExpertFileError
from moder.features import FeatureFileError, read_features
from moder.io import atomic_path
from moder.params import Params, ParamsError, load_params


class MissingInput(RuntimeError):
    """A stage's input file is not there; the message names it and the stage that makes it."""


# Errors a user can fix from the message alone: printed as one line, no traceback.
USER_ERRORS = (ParamsError, ModelLoadError, FeatureFileError, ExpertFileError, MissingInput, DatasetNotFound,
               DatasetFormatError)


def parser(description: str, *paths: tuple[str, str]) -> argparse.ArgumentParser:
    """--params plus one required path option per (name, help); dvc.yaml passes every path explicitly."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    for name, text in paths:
        parser.add_argument(f"--{name}", type=Path, required=True, help=text)
    return parser


def load_backbone(params: Params, path: Path) -> LoadedClip:
    """The frozen CLIP every stage after `backbone` uses, from the file that stage wrote."""
    if not path.is_file():
        raise ModelLoadError(f"backbone CLIP not found: {path} (run the backbone stage: dvc repro backbone)")
    return load_clip(params.model.architecture, checkpoint=path, cache_dir=params.model.cache_dir,
                     device=params.model.device, seed=params.seed)


def check_task(params: Params, task: str) -> None:
    if task not in params.tasks:
        raise ParamsError(f"unknown task {task!r}; params.yaml tasks: {', '.join(params.tasks)}")


def run_cli(main: Callable[[argparse.Namespace, Params], None], args: argparse.Namespace) -> None:
    """Load the params named on the command line and run `main`; user errors exit with one line."""
    try:
        main(args, load_params(args.params))
    except USER_ERRORS as error:
        sys.exit(f"error: {error}")


def tasks_of(params: Params, n_classes: dict[str, int]) -> list[Task]:
    """The tasks, in sequence order, of the datasets in `n_classes` (dataset -> number of classes)."""
    return [
        make_task(name, step, task.dataset, task.split, params.datasets[task.dataset].splits,
                  n_classes[task.dataset], params.seed, params.datasets[task.dataset].class_order == "shuffled")
        for step, (name, task) in enumerate(params.tasks.items(), start=1)
        if task.dataset in n_classes
    ]


def split_tasks(params: Params, dataset: str, n_classes: int) -> list[Task]:
    """A dataset's splits 1..splits as tasks named "<dataset> split <i>", in training order."""
    spec = params.datasets[dataset]
    return [make_task(f"{dataset} split {split}", split, dataset, split, spec.splits, n_classes, params.seed,
                      spec.class_order == "shuffled") for split in range(1, spec.splits + 1)]


def expert_file(dataset_experts: Path, split: int) -> Path:
    """Where train@<dataset> writes the experts of one split (task) of its dataset."""
    return dataset_experts / f"split-{split}.safetensors"


def load_sequence(params: Params, features: Path, identity: str) -> list[TaskData]:
    """Every task's classes, zero-shot prototypes, templates and test features, from <features>/<dataset>/."""
    datasets = dict.fromkeys(task.dataset for task in params.tasks.values())
    classes = {d: read_features(features / d / "classes.parquet", identity) for d in datasets}
    tests = {d: read_features(features / d / "test.parquet", identity) for d in datasets}
    sequence = []
    for task in tasks_of(params, {d: len(table.class_names) for d, table in classes.items()}):
        table = classes[task.dataset]
        vectors, labels = tests[task.dataset].select(task.classes)
        sequence.append(TaskData(task, [table.class_names[i] for i in task.classes], table.vectors[task.classes],
                                 vectors, labels, table.templates))
    return sequence


def write_rows(path: Path, rows: list, row_type: type) -> None:
    """Dataclass rows as Parquet (the schema comes from the row type, so an empty table is still typed)."""
    names = [field.name for field in fields(row_type)]
    kinds = {"str": pa.string(), "float": pa.float64(), "int": pa.int64()}
    schema = pa.schema([(field.name, kinds[field.type]) for field in fields(row_type)])
    table = pa.Table.from_pylist([{n: getattr(row, n) for n in names} for row in rows], schema=schema)
    with atomic_path(path) as temporary:
        pq.write_table(table, temporary)
