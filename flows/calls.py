"""Stage instances as `dvc.yaml` defines them, and the key under which the store caches one: shared by the
Prefect flow and by the backbone stage that `dvc repro` runs, so each finds what the other pre-trained.

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

from flows.store import ArtifactRecord, Store, files_below

# The backbone stage's outputs in the flow's layout (paths in a task's scratch directory, names in the store)
BACKBONE = "backbone/clip.safetensors"
BACKBONE_SUMMARY = "reports/backbone.json"


@dataclass(frozen=True)
class StageCall:
    """One stage instance as DVC defines it: its name, the params it reads, the digest of its code."""

    stage: str
    name: str  # the foreach key ("" for stages without foreach)
    params: dict[str, Any]
    code: str

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
            calls[stage.name] = StageCall(group, key, params, _digest_paths(dvc_yaml.parent, code))
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


def reuse_or_run(call: StageCall, store: Store, files: dict[str, Path], run: Callable[[], object]) -> bool:
    """Run a stage without inputs through the store: restore its files when the store holds this call's
    record (written by the flow or by an earlier run), else `run()` and store what it wrote under the
    call's key, as the flow does. `files`: each output's name in the flow's layout -> its path here.
    True when restored."""
    key = cache_key(call, {})
    record = store.lookup(key)  # every blob verified; a tampered one is an error naming it
    if record is not None and set(record.files) == set(files):
        with tempfile.TemporaryDirectory(dir=next(iter(files.values())).parent) as scratch:
            store.materialise(record, Path(scratch), call.label)
            for name, target in files.items():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(Path(scratch) / name, target)
        return True
    run()
    store.save(key, store.put_files(files))
    return False
