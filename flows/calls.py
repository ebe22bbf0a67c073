"""Stage instances as `dvc.yaml` defines them, how the flow wires them, and the key under which the store
caches one: shared by the Prefect flow and by the stages `dvc repro` runs, so each finds what the other made.

A key is the stage instance, the slice of params it reads and the digest of its code (both resolved from
`dvc.yaml` by DVC itself, so DVC and Prefect invalidate the same things) plus the digests of its inputs.
"""

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dvc.dependency.param import ParamsDependency
from dvc.fs import MemoryFileSystem
from dvc.repo import Repo

from flows.store import ArtifactRecord, Store, digest_files, files_below
from moder.params import Params


@dataclass(frozen=True)
class StageCall:
    """One stage instance as DVC defines it: its name, the params it reads, the digest of its code."""

    stage: str
    name: str  # the foreach key ("" for stages without foreach)
    params: dict[str, Any]
    code: str
    outs: tuple[str, ...] = ()  # its outputs as dvc.yaml names them (paths in the project), not in the key

    @property
    def label(self) -> str:
        return f"{self.stage}@{self.name}" if self.name else self.stage


def _digest_paths(root: Path, paths: list[str]) -> str:
    digest = hashlib.sha256()
    for relative in sorted(paths):
        for file in files_below(root / relative):
            digest.update(file.relative_to(root).as_posix().encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def stage_calls(dvc_yaml: Path, params_data: dict) -> dict[str, StageCall]:
    """Every stage instance of `dvc.yaml` with its params slice and code digest, keyed by its DVC name."""
    # DVC resolves a dvc.yaml against the params.yaml beside it, but the flow's params may come from another file and
    # its code may be a copy without .dvc/: so DVC reads this dvc.yaml with `params_data` as params.yaml, in memory.
    fs = MemoryFileSystem(global_store=False)
    fs.pipe({"/dvc.yaml": dvc_yaml.read_bytes(), "/params.yaml": json.dumps(params_data).encode()})  # JSON is YAML
    calls = {}
    with Repo("/", fs=fs, uninitialized=True) as repo:
        for stage in repo.index.stages:
            group, _, key = stage.name.partition("@")
            params = {name: value for dep in stage.params for name, value in dep.read_params().items()}
            # Stage outputs (under data/) are inputs, in the cache key by their digests; every other dep is code.
            code = [
                dep.def_path
                for dep in stage.deps
                if not isinstance(dep, ParamsDependency) and not dep.def_path.startswith("data/")
            ]
            outs = tuple(out.def_path for out in stage.outs)
            calls[stage.name] = StageCall(group, key, params, _digest_paths(dvc_yaml.parent, code), outs)
    return calls


def cache_key(call: StageCall, inputs: dict[str, ArtifactRecord]) -> str:
    """The stage instance, its params slice, its code digest and the digests of its inputs."""
    payload = {
        "stage": call.label,
        "params": call.params,
        "code": call.code,
        "inputs": {name: artifact.digest for name, artifact in sorted(inputs.items())},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def stage_inputs(params: Params) -> dict[str, dict[str, tuple[str, str | None]]]:
    """The flow's wiring, in dependency order: each stage instance -> {input name: (the stage instance whose
    outputs it is, or with a path only that file of them)}. The flow submits its tasks from it and a
    DVC stage finds its inputs by it, so that both compute the same cache key."""
    used = list(dict.fromkeys(task.dataset for task in params.tasks.values()))  # datasets some task trains on
    backbone = {"backbone": ("backbone", None)}
    features = {f"extract@{d}": (f"extract@{d}", None) for d in used}
    trained = {f"train@{d}": (f"train@{d}", None) for d in used}
    wiring: dict[str, dict[str, tuple[str, str | None]]] = {"backbone": {}, "scan": {}}
    # as in dvc.yaml, an extract reads its own dataset's listing: changed images re-run that extract alone
    wiring |= {f"extract@{d}": {**backbone, "scan": ("scan", f"scans/{d}.json")} for d in used}
    wiring |= {f"train@{d}": {**backbone, f"extract@{d}": (f"extract@{d}", None)} for d in used}
    wiring["finetune"] = {**backbone, **features}
    seen: dict[str, tuple[str, str | None]] = {}
    for name, step in params.tasks.items():  # the hub after a step: the datasets trained by then
        d = step.dataset
        seen |= {f"extract@{d}": (f"extract@{d}", None), f"train@{d}": (f"train@{d}", None)}
        wiring[f"hub@{name}"] = {**backbone, **seen}
    # every step reads every task's experts: the oracle scores tasks not yet trained with their own
    for name in params.tasks:
        wiring[f"evaluate@{name}"] = {**backbone, **features, **trained, f"hub@{name}": (f"hub@{name}", None)}
    last = list(params.tasks)[-1]  # the report prices the hub after the last step
    evaluated = {f"evaluate@{t}": (f"evaluate@{t}", None) for t in params.tasks}
    wiring["report"] = {"finetune": ("finetune", None), **evaluated, f"hub@{last}": (f"hub@{last}", None), **trained}
    return wiring


# Stages `dvc repro` runs through the store: the ones worth not running twice (the others take seconds;
# scan lists files at every run, report writes git-tracked files beside the backbone's summary in reports/)
SHARED_STAGES = ("backbone", "extract", "train", "finetune", "hub", "evaluate")


def flow_name(path: str, benchmark: str) -> str:
    """A project path as the flow names it in a task's scratch directory and in the store: without data/<benchmark>/
    (or data/ for the backbone, which benchmarks share)."""
    for prefix in (f"data/{benchmark}/", "data/"):
        if path.startswith(prefix):
            return path[len(prefix) :]
    return path


def workspace_files(call: StageCall, root: Path, benchmark: str) -> dict[str, Path]:
    """The files a stage instance wrote in the project at `root`, by their names in the flow's layout."""
    return {
        flow_name(file.relative_to(root).as_posix(), benchmark): file
        for out in call.outs
        for file in files_below(root / out)
    }


def _placement(names: list[str], targets: dict[str, Path]) -> dict[str, Path] | None:
    """Where each file of a record goes among a stage's outputs (flow name -> project path); None unless the
    record fills every output and holds nothing else."""
    placed, filled = {}, set()
    for name in names:
        out = next((o for o in targets if name == o or name.startswith(f"{o}/")), None)
        if out is None:
            return None
        filled.add(out)
        placed[name] = targets[out] if name == out else targets[out] / name[len(out) + 1 :]
    return placed if filled == set(targets) else None


def run_through_store(label: str, params: Params, dvc_yaml: Path, store: Store, run: Callable[[], object]) -> bool:
    """Run stage instance `label` of the project at dvc_yaml's directory as the flow would: its inputs are the
    outputs its upstream stages left in the project, its key the flow's; when the store holds that key's
    record (the flow's, or an earlier run's), restore its files instead of running, else `run()` and store
    what it wrote. True when restored."""
    wiring = stage_inputs(params)
    if label not in wiring:  # a dataset no task uses: dvc.yaml extracts and trains it, the flow never does
        run()
        return False
    root, benchmark = dvc_yaml.parent, params.benchmark.name
    calls = stage_calls(dvc_yaml, params.model_dump(mode="json"))
    call = calls[label]
    inputs = {}
    for name, (upstream, only) in wiring[label].items():
        files = workspace_files(calls[upstream], root, benchmark)
        inputs[name] = digest_files({k: v for k, v in files.items() if k == only} if only else files)
    key = cache_key(call, inputs)
    record = store.lookup(key)  # every blob verified; a tampered one is an error naming it
    targets = {flow_name(out, benchmark): root / out for out in call.outs}
    placed = _placement(list(record.files), targets) if record is not None else None
    if record is not None and placed is not None:  # else a record of another layout: run instead
        scratch_base = root / ".dvc" / "tmp"  # DVC's own temporaries: never part of an output
        scratch_base.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=scratch_base) as scratch:
            store.materialise(record, Path(scratch), label)  # every blob verified before any output moves
            for name, target in placed.items():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(Path(scratch) / name, target)
        return True
    run()
    store.save(key, store.put_files(workspace_files(call, root, benchmark)))
    return False
