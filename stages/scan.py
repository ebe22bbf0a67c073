"""Stage `scan`: a listing of each image dataset's files, so that changed images re-run that dataset's `extract`.

`extract` is a foreach stage over every dataset and embedded datasets have no folder, so dvc.yaml cannot
name a dataset's folder as its dependency. This stage (always run: it only lists files) writes
<out>/<dataset>.json per dataset, and `extract@<dataset>` depends on that one file: the number of files,
their bytes and a SHA-256 over every file's relative path, size and modification time. DVC re-runs an
`extract` only when its listing changes: an image added, removed, replaced or touched. (Hashing the
images' contents at every `dvc repro` would read whole datasets, ImageNet's 150 GB included; size and
mtime are what DVC's own cache state trusts.) An embedded dataset is rendered from params, which
`extract` reads already: its listing says so and never changes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

from moder.io import atomic_directory
from moder.params import Params
from stages.common import MissingInput, parser, run_cli

USES_DEVICE = False


def dataset_listing(params: Params, dataset: str) -> dict:
    spec = params.datasets[dataset]
    if spec.source == "embedded":
        return {"dataset": dataset, "source": "embedded"}
    assert spec.root is not None  # params validation requires a root for image datasets
    root = Path(spec.root)
    if not root.is_dir():
        raise MissingInput(f"dataset {dataset}: root {root} is not a directory (datasets.{dataset}.root)")
    digest, files, size = hashlib.sha256(), 0, 0
    # a sorted walk that follows links: a dataset folder is often a link to shared storage
    for folder, directories, names in os.walk(root, followlinks=True):
        directories.sort()
        for name in sorted(names):
            path = Path(folder) / name
            stat = path.stat()
            digest.update(f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            files, size = files + 1, size + stat.st_size
    return {
        "dataset": dataset,
        "source": spec.source,
        "root": spec.root,
        "files": files,
        "bytes": size,
        "sha256": digest.hexdigest(),
    }


def scan(params: Params, out: Path) -> dict[str, dict]:
    """Writes <out>/<dataset>.json for every dataset of params.yaml."""
    listings = {dataset: dataset_listing(params, dataset) for dataset in params.datasets}
    with atomic_directory(out, owner="scan") as directory:
        for dataset, listing in listings.items():
            (directory / f"{dataset}.json").write_text(json.dumps(listing, indent=1) + "\n")
    return listings


def cli() -> argparse.ArgumentParser:
    return parser(__doc__, ("out", "the directory of listings"))


def run(args: argparse.Namespace, params: Params) -> None:
    scan(params, args.out)


def main() -> None:
    run_cli(run, cli().parse_args())


if __name__ == "__main__":
    main()
