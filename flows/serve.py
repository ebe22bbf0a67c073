"""Serve the pipeline as a deployment: `python -m flows.serve` (needs PREFECT_API_URL of a running server).

The deployment's default `params` are the settings of `--params` (params.yaml) as they are when serving
starts, every one typed and editable in the UI's Custom run form (e.g. retrieval.k); restart serving to
pick up later edits of the file. Trigger runs with `prefect deployment run 'moder-pipeline/moder'`
(optionally `--param out_dir=... --param store=...`; the store, `out/store` by default, is resolved in the
serving process's directory). `--dask-workers N` runs each flow's tasks on a local Dask cluster of N
workers; `--dask-address tcp://host:8786` on an existing cluster. For workers on other machines (a work
pool), see prefect.yaml.
"""

from __future__ import annotations

import argparse
import sys

from flows.pipeline import moder_pipeline, with_task_runner
from moder.params import ParamsError, load_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="moder", help="the deployment name (default: moder)")
    parser.add_argument("--params", default="params.yaml", help="the settings the deployment offers by default")
    parser.add_argument("--dask-workers", type=int, default=None)
    parser.add_argument("--dask-address", default=None)
    args = parser.parse_args()
    try:
        params = load_params(args.params)
    except ParamsError as error:
        sys.exit(f"error: {error}")
    pipeline = with_task_runner(moder_pipeline, args.dask_workers, args.dask_address)
    pipeline.serve(name=args.name, parameters={"params": params.model_dump(mode="json")})


if __name__ == "__main__":
    main()
