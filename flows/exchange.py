"""The explicit exchange between the Prefect flow's store and a DVC project's workspace. DVC stages know nothing
of the store; the flow's side does both directions:

- `offer`: the outputs `dvc repro` left up to date go into the store under the keys the flow computes for
  them (from the project's own params.yaml), so a flow run with the same settings finds them Cached. The flow
  calls it before it submits any task.
- `restore` (`python -m flows.exchange restore`, run by `make run` before `dvc repro`): the outputs the store
  holds for the project's settings are brought into the workspace and recorded with DVC (`dvc commit`), so
  `dvc repro` runs none of those stages again.

Keys are content-addressed on the files a stage read, so a stage's workspace outputs are used only where they
are exactly what the key names; nothing is trusted that DVC does not call up to date.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from flows.graph import StageCall, pipeline
from flows.runner import cache_key, inputs_of, outputs
from flows.store import DEFAULT_STORE, ArtifactRecord, Store, StoreError, digest_files
from moder.errors import USER_ERRORS
from moder.params import load_params


def _project(root: Path) -> tuple[dict[str, StageCall], set[str]] | None:
    """The project's stage instances (from its dvc.yaml and params.yaml) and those DVC calls stale; None outside
    a DVC project."""
    if not (root / ".dvc").is_dir() or not (root / "params.yaml").is_file():
        return None
    from dvc.repo import Repo

    calls = pipeline(root / "dvc.yaml", load_params(root / "params.yaml").model_dump(mode="json"))
    with Repo(str(root)) as repo:
        stale = set(repo.status())
    return calls, stale


def offer(root: Path, store: Store) -> list[str]:
    """Store the up-to-date outputs of the DVC project at `root` under the flow's keys; the labels offered."""
    found = _project(root)
    if found is None:
        return []
    calls, stale = found
    records: dict[str, ArtifactRecord] = {}
    offered = []
    for label, call in calls.items():
        files = outputs(call, root)
        upstream = {u for i in call.inputs for u in i.upstream}
        if label in stale and not call.always or not files or not upstream <= set(records):
            continue  # stale, not made, or made from something stale: not what any key names
        records[label] = digest_files(files)
        key = cache_key(call, inputs_of(call, records))
        if not call.always and store.lookup(key) is None:
            store.save(key, store.put_files(files))
            offered.append(label)
    return offered


def restore(root: Path, store: Store) -> list[str]:
    """Bring into the workspace of the DVC project at `root` every stage output the store holds for its settings
    (the always-run stages, which take seconds, first run under DVC), and record them with DVC; the labels
    restored. A stage whose inputs are neither up to date nor restored is left to `dvc repro`."""
    from dvc.repo import Repo

    found = _project(root)
    if found is None:
        raise StoreError(f"{root} is not a DVC project with a params.yaml: nothing to restore into")
    calls, stale = found
    with Repo(str(root)) as repo:
        for label, call in calls.items():
            if call.always and label in stale:
                repo.reproduce(label, single_item=True)
    records: dict[str, ArtifactRecord] = {}  # what each usable stage's outputs are now
    restored: list[str] = []
    for label, call in calls.items():
        upstream = {u for i in call.inputs for u in i.upstream}
        if not upstream <= set(records):
            continue  # made from something neither up to date nor restored: left to dvc repro
        files = outputs(call, root)
        here = digest_files(files) if files else None
        current = here is not None and (call.always or label not in stale) and not upstream & set(restored)
        record = None if current else store.lookup(cache_key(call, inputs_of(call, records)))
        if record is not None:
            if record != here:
                _place(record, call, root, store)
            restored.append(label)  # placed, or already there but not yet recorded by DVC
            records[label] = record
        elif current and here is not None:
            records[label] = here
    if restored:
        with Repo(str(root)) as repo:
            for label in restored:
                repo.commit(label, force=True)
    return restored


def check_outputs(record: ArtifactRecord, call: StageCall) -> None:
    """A record restored into a workspace must hold the outputs dvc.yaml gives its stage instance, and nothing
    else: a record substituted by a store writer cannot put a file anywhere but where that stage writes."""
    below = [o.rstrip("/") for o in call.outs]
    stray = [name for name in record.files if not any(name == o or name.startswith(f"{o}/") for o in below)]
    missing = [o for o in below if not any(name == o or name.startswith(f"{o}/") for name in record.files)]
    if stray or missing:
        found = f"holds {stray[0]}, not an output of it" if stray else f"lacks its output {missing[0]}"
        raise StoreError(f"the store's record of {call.label} {found}: nothing restored")


def _place(record: ArtifactRecord, call: StageCall, root: Path, store: Store) -> None:
    """The record's files as the stage's outputs in the workspace: checked against the stage's outputs, every
    blob verified in a scratch directory first, then each output replaced whole (as `dvc repro` replaces a
    stage's outputs)."""
    check_outputs(record, call)
    scratch_base = root / ".dvc" / "tmp"  # DVC's own temporaries: never part of an output
    scratch_base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch_base) as scratch:
        store.materialise(record, Path(scratch), call.label)
        for out in call.outs:
            source, target = Path(scratch) / out, root / out
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            shutil.move(source, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["restore", "offer"])
    parser.add_argument("--store", default=DEFAULT_STORE, help=f"a path or fsspec URL (default: {DEFAULT_STORE})")
    parser.add_argument("--project", type=Path, default=Path("."), help="the DVC project (default: here)")
    args = parser.parse_args()
    if args.command == "restore" and "://" not in args.store and not Path(args.store).is_dir():
        print(f"no store at {args.store}: nothing to restore")
        return
    try:
        store = Store(args.store)
        done = restore(args.project, store) if args.command == "restore" else offer(args.project, store)
    except USER_ERRORS as error:
        sys.exit(f"error: {error}")
    verb = "restored from" if args.command == "restore" else "offered to"
    print(f"{len(done)} stage(s) {verb} {store.url}{': ' + ', '.join(done) if done else ''}")


if __name__ == "__main__":
    main()
