"""Serve the pipeline as a deployment: `python -m flows.serve` (needs PREFECT_API_URL of a running server).

Then trigger runs with `prefect deployment run 'moder-pipeline/moder'` (optionally
`--param params_path=... --param out_dir=... --param store=...`; the store, `out/store` by default,
is resolved in the serving process's directory). `--dask-workers N` runs each flow's tasks on a
local Dask cluster of N workers; `--dask-address tcp://host:8786` on an existing cluster.
"""

from __future__ import annotations

import argparse

from flows.pipeline import moder_pipeline, with_task_runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", default="moder", help="the deployment name (default: moder)")
    parser.add_argument("--dask-workers", type=int, default=None)
    parser.add_argument("--dask-address", default=None)
    args = parser.parse_args()
    with_task_runner(moder_pipeline, args.dask_workers, args.dask_address).serve(name=args.name)


if __name__ == "__main__":
    main()
