"""Running stage instances of the pipeline graph (flows/graph.py) in this process, as `dvc repro` runs them:
each stage's own command line (from dvc.yaml) parsed by the stage's own parser, every path of it placed below
a working directory. With a store (flows/store.py), each instance is cached under a key of its params slice,
its code and its inputs' digests: a hit restores nothing and runs nothing, it hands the record on.

Used by the Prefect flow (one task per instance), by scripts/validate.py, by the scale benchmark and by the
tests; none of them writes the graph or the paths again.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from flows.graph import StageCall
from flows.store import ArtifactRecord, Store
from moder.params import Params

Inputs = dict[str, ArtifactRecord]  # dependency path (as dvc.yaml names it) -> the files there


def run_call(call: StageCall, params: Params, root: Path) -> None:
    """Run `call` with `params`: its module's `run` on its command line as dvc.yaml gives it, each relative path
    of the command line below `root` (where its inputs must already be, in the project's layout)."""
    module = importlib.import_module(call.module)
    args = module.cli().parse_args(list(call.argv))
    for name, value in vars(args).items():
        if isinstance(value, Path) and not value.is_absolute():
            setattr(args, name, root / value)
    module.run(args, params)


def cache_key(call: StageCall, inputs: Inputs) -> str:
    """The stage instance, its params slice, its code digest and the digests of its inputs."""
    payload = {
        "stage": call.label,
        "params": call.params,
        "code": call.code,
        "inputs": {path: record.digest for path, record in sorted(inputs.items())},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def inputs_of(call: StageCall, records: dict[str, ArtifactRecord]) -> Inputs:
    """`call`'s inputs from its upstream instances' records: for each dependency, the files below it."""
    return {i.path: merged([records[u] for u in i.upstream], i.path) for i in call.inputs}


def merged(records: Iterable[ArtifactRecord], below: str) -> ArtifactRecord:
    """One record of the files of `records` at or below the project path `below`."""
    prefix = below.rstrip("/") + "/"
    return ArtifactRecord.of(
        {name: digest for r in records for name, digest in r.files.items() if name == below or name.startswith(prefix)}
    )


def outputs(call: StageCall, root: Path) -> dict[str, Path]:
    """The files `call` wrote below `root`, by project path."""
    from flows.store import files_below

    return {f.relative_to(root).as_posix(): f for out in call.outs for f in files_below(root / out)}


def cached_run(
    call: StageCall,
    params: Params,
    inputs: Inputs,
    store: Store,
    on_hit: Callable[[str], object] = print,
) -> tuple[ArtifactRecord, bool]:
    """`call`'s outputs as a record, and whether they came from the store: its record under the key if there
    is one (announced through `on_hit`), else it runs in a scratch directory holding its inputs and what it
    wrote goes into the store."""
    key = cache_key(call, inputs)
    cached = None if call.always else store.lookup(key)
    if cached is not None:
        on_hit(f"{call.label} cached in {store.record(key)}")
        return cached, True
    with tempfile.TemporaryDirectory(prefix=f"moder-{call.label.replace('@', '-')}-") as scratch:
        root = Path(scratch)
        for path, record in inputs.items():
            store.materialise(record, root, f"{call.label} input {path}")
        run_call(call, params, root)
        record = store.put_files(outputs(call, root))
    if not call.always:  # an always-run stage's record would never be looked up
        store.save(key, record)
    return record, False


def run_graph(
    calls: dict[str, StageCall], params: Params, store: Store, targets: Iterable[str] | None = None
) -> dict[str, ArtifactRecord]:
    """Every instance of `calls` (or only what `targets` need), in order, through the store; their records."""
    needed = set(calls) if targets is None else upstream_of(calls, targets)
    records: dict[str, ArtifactRecord] = {}
    for label, call in calls.items():
        if label in needed:
            records[label], _ = cached_run(call, params, inputs_of(call, records), store)
    return records


def upstream_of(calls: dict[str, StageCall], targets: Iterable[str]) -> set[str]:
    """`targets` and every instance they read from, transitively."""
    found, todo = set(), list(targets)
    while todo:
        label = todo.pop()
        if label not in found:
            found.add(label)
            todo += [u for i in calls[label].inputs for u in i.upstream]
    return found
