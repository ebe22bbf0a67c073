"""What every stage shares: its command line, loading the backbone, and turning errors into one clear line."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from flows.calls import SHARED_STAGES, run_through_store
from flows.store import Store, StoreError, project_store
from moder.clip import LoadedClip, ModelLoadError, load_clip
from moder.datasets import DatasetFormatError, DatasetNotFound
from moder.evaluation import TrainedTask
from moder.experts import ExpertFileError, Experts, load_experts
from moder.features import FeatureFileError, FeatureTable, read_features, read_prototypes
from moder.hub import HubFileError
from moder.io import OutputError, atomic_path
from moder.names import PromptError
from moder.params import Params, ParamsError, load_params
from moder.tasks import TaskData, benchmark_tasks
from moder.train import TrainingDiverged


class MissingInput(RuntimeError):
    """A stage's input file is not there; the message names it and the stage that makes it."""


# Errors a user can fix from the message alone: printed as one line, no traceback.
USER_ERRORS = (
    ParamsError,
    ModelLoadError,
    FeatureFileError,
    ExpertFileError,
    MissingInput,
    DatasetNotFound,
    DatasetFormatError,
    HubFileError,
    OutputError,
    PromptError,
    TrainingDiverged,
    StoreError,
)


def parser(description: str, *paths: tuple[str, ...]) -> argparse.ArgumentParser:
    """--params plus one required path option per (name, help[, suffix]); dvc.yaml passes every path
    explicitly. With a suffix, the option only takes a file of that kind, so a slip such as
    `--out params.yaml` is refused before anything is written."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    for name, text, *suffix in paths:
        parser.add_argument(f"--{name}", type=path_with_suffix(*suffix) if suffix else Path, required=True, help=text)
    return parser


def path_with_suffix(suffix: str) -> Callable[[str], Path]:
    def checked(value: str) -> Path:
        if Path(value).suffix != suffix:
            raise argparse.ArgumentTypeError(f"{value!r} is not a {suffix} file")
        return Path(value)

    return checked


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


def check_task(params: Params, task: str) -> None:
    if task not in params.tasks:
        raise ParamsError(f"unknown task {task!r}; params.yaml tasks: {', '.join(params.tasks)}")


def run_cli(main: Callable[[argparse.Namespace, Params], object], args: argparse.Namespace) -> None:
    """Load the params named on the command line and run `main`; user errors exit with one line."""
    try:
        main(args, load_params(args.params))
    except USER_ERRORS as error:
        sys.exit(f"error: {error}")


def run_shared_cli(main: Callable[[argparse.Namespace, Params], object], args: argparse.Namespace) -> None:
    """run_cli for a stage worth not running twice. Under `dvc repro` (DVC names the stage instance in
    DVC_STAGE and runs it at the project's root) it goes through the content-addressed store it shares
    with the Prefect flow (out/store of the project, flows/calls.py): when the flow or an earlier run made
    this instance's outputs from the same params, code and inputs, they are restored from there; else it
    runs and stores them, for the flow to find. Run by hand, it just runs."""
    label = os.environ.get("DVC_STAGE", "")

    def through_store(args: argparse.Namespace, params: Params) -> None:
        if label.partition("@")[0] not in SHARED_STAGES:
            main(args, params)
            return
        store = project_store()
        if run_through_store(label, params, Path("dvc.yaml"), Store(store), lambda: main(args, params)):
            print(f"{label}: restored from {store} (the flow's or an earlier run's: same params, code and inputs)")

    run_cli(through_store, args)


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
