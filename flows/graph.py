"""The pipeline as dvc.yaml describes it, read by DVC itself: every stage instance with the command it runs,
the params slice it reads, the digest of its code, the files it reads and writes, and which other instances'
outputs those files are. The Prefect flow, the in-process runner (validate.py, the tests, the scale
benchmark) and the exchange with DVC's workspace all take their graph from here: dvc.yaml is the one
description of the pipeline.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass
from graphlib import TopologicalSorter
from pathlib import Path
from typing import Any

from dvc.dependency.param import ParamsDependency
from dvc.fs import MemoryFileSystem
from dvc.repo import Repo

from moder.io import file_digest


class PipelineError(ValueError):
    """dvc.yaml describes a stage the runner cannot run; the message names it."""


@dataclass(frozen=True)
class Input:
    """Files a stage reads that another stage wrote: `upstream`'s outputs below `path` (a dep of dvc.yaml)."""

    path: str  # the dependency as dvc.yaml names it (a file, or a directory of several stages' outputs)
    upstream: tuple[str, ...]  # the stage instances whose outputs lie at or below (or hold) that path


@dataclass(frozen=True)
class StageCall:
    """One stage instance as DVC defines it."""

    label: str  # DVC's name: backbone, train@sketch, ...
    module: str  # the stage module its command runs: `python -m <module> <argv>`
    argv: tuple[str, ...]
    params: dict[str, Any]  # the params slice it reads, as DVC resolves it
    code: str  # SHA-256 over its dependencies that no stage writes (code, configs), path and bytes
    inputs: tuple[Input, ...]  # its dependencies that other stages write
    outs: tuple[str, ...]  # what it writes (metrics included), project paths
    always: bool = False  # always_changed: it runs every time (its output, not its run, is cached)


def _code_digest(root: Path, paths: list[str]) -> str:
    digest = hashlib.sha256()
    for relative in sorted(paths):
        top = root / relative
        for file in [top] if top.is_file() else sorted(f for f in top.rglob("*") if f.is_file()):
            if "__pycache__" not in file.parts:
                digest.update(file.relative_to(root).as_posix().encode() + b"\0" + bytes.fromhex(file_digest(file)))
    return digest.hexdigest()


def _related(dep: str, out: str) -> bool:
    """Whether a dependency path reads an output: the same path, a directory holding it, or a file inside it."""
    return dep == out or out.startswith(dep.rstrip("/") + "/") or dep.startswith(out.rstrip("/") + "/")


def _command(label: str, cmd: str) -> tuple[str, tuple[str, ...]]:
    words = shlex.split(cmd)
    if len(words) < 3 or words[:2] != ["python", "-m"] or not words[2].startswith("stages."):
        raise PipelineError(f"stage {label}: its cmd {cmd!r} is not `python -m stages.<name> ...`")
    return words[2], tuple(words[3:])


def pipeline(dvc_yaml: Path, params_data: dict) -> dict[str, StageCall]:
    """Every stage instance of `dvc_yaml` that writes something, resolved against `params_data` (as
    params.yaml), in an order where each comes after the instances it reads from."""
    # DVC resolves a dvc.yaml against the params.yaml beside it, but the params may come from elsewhere (a
    # flow run's parameters) and the code may be a copy without .dvc/: so DVC reads them in memory.
    fs = MemoryFileSystem(global_store=False)
    fs.pipe({"/dvc.yaml": dvc_yaml.read_bytes(), "/params.yaml": json.dumps(params_data).encode()})  # JSON is YAML
    with Repo("/", fs=fs, uninitialized=True) as repo:
        stages = [stage for stage in repo.index.stages if stage.outs]
        outs = {stage.name: tuple(out.def_path for out in stage.outs) for stage in stages}
        calls = {}
        for stage in stages:
            files = [dep.def_path for dep in stage.deps if not isinstance(dep, ParamsDependency)]
            inputs = []
            for path in files:
                upstream = tuple(name for name, paths in outs.items() if any(_related(path, o) for o in paths))
                if upstream:
                    inputs.append(Input(path, upstream))
            read = {i.path for i in inputs}
            params = {name: value for dep in stage.params for name, value in dep.read_params().items()}
            module, argv = _command(stage.name, stage.cmd)
            code = _code_digest(dvc_yaml.parent, [f for f in files if f not in read])
            calls[stage.name] = StageCall(
                stage.name, module, argv, params, code, tuple(inputs), outs[stage.name], stage.always_changed
            )
    order = TopologicalSorter({label: {u for i in call.inputs for u in i.upstream} for label, call in calls.items()})
    return {label: calls[label] for label in order.static_order()}
