"""`make run` until the pipeline lands: the core on a tiny model and generated features."""
from __future__ import annotations

import argparse
import sys

from moder.clip import ModelLoadError
from moder.demo import run_demo
from moder.params import ParamsError, load_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    try:
        params = load_params(args.params)
        result = run_demo(params)
    except (ParamsError, ModelLoadError) as error:
        sys.exit(f"error: {error}")
    print(f"\nMoDER demo: {params.model.architecture}, {params.expert.kind} experts, "
          f"{params.composition.space}-space composition, k={params.retrieval.k}, seed={params.seed}")
    print(f"training loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f} over {len(result.losses)} steps\n")
    print(f"{'task':<28}{'zero-shot':>10}{'MoDER':>10}{'diff':>8}")
    for task, zeroshot, moder in result.rows:
        print(f"{task:<28}{zeroshot:>10.1f}{moder:>10.1f}{moder - zeroshot:>+8.1f}")
    print("\nretrieved experts for the first unseen classes:")
    for name, experts in result.retrieved[:4]:
        print(f"  {name:<18} " + ", ".join(f"{hub_class} ({weight:.2f})" for hub_class, weight in experts))


if __name__ == "__main__":
    main()
