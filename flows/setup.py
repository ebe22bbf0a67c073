"""Set up the Prefect server for this project: cap tasks tagged `gpu` at the number of GPUs.

Run once per server (idempotent): `python -m flows.setup` (or `--gpus N` to set the cap by hand).
Machines without a GPU get a cap of 1, so GPU-tagged tasks still run, one at a time.
"""

from __future__ import annotations

import argparse

import torch
from prefect.client.orchestration import get_client

from flows.pipeline import GPU_TAG


def gpu_slots(requested: int | None = None) -> int:
    return requested if requested is not None else max(1, torch.cuda.device_count())


def set_gpu_limit(slots: int) -> int:
    """Create or update the tag concurrency limit; returns the limit now in force."""
    if slots < 1:
        raise ValueError(f"the gpu limit must be at least 1, got {slots}")
    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=slots)
        return client.read_concurrency_limit_by_tag(GPU_TAG).concurrency_limit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gpus", type=int, default=None, help="override the detected GPU count")
    args = parser.parse_args()
    print(f"tag concurrency limit '{GPU_TAG}' = {set_gpu_limit(gpu_slots(args.gpus))}")


if __name__ == "__main__":
    main()
