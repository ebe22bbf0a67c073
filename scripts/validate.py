"""Choose defaults on validation worlds: MoDER minus zero-shot for candidate settings, over suite cases and seeds.

Validation seeds draw other worlds than the reported ones (the seed draws each dataset's classes, the tint
directions, the images and every initialisation), so a setting chosen here is reported on seeds and images
that played no part in the choice (`make suite`, seeds 0-2). Runs the same stage functions as `dvc repro`
in this process (a DVC experiment per candidate would spend most of its time starting Python), caching
each stage's outputs under --out by the params it reads, so candidates that differ only in retrieval or
composition re-run only the hub and evaluation.

    python scripts/validate.py --seeds 100 101 102 \\
        --candidate committed "" --candidate gated "retrieval.gate=0.9 composition.alpha_unseen=0.5"

Prints one row per candidate: per case, MoDER - zero-shot Transfer and Last (mean over seeds), then the
worst case and the mean over cases; writes the same as JSON to <out>/validation.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moder.metrics import summarize  # noqa: E402
from moder.params import Params, parse_params  # noqa: E402
from scripts.suite_table import SUITE  # noqa: E402
from stages.backbone import backbone  # noqa: E402
from stages.compose import compose_data  # noqa: E402
from stages.evaluate import evaluate  # noqa: E402
from stages.extract import extract  # noqa: E402
from stages.hub import hub  # noqa: E402
from stages.train import train  # noqa: E402

METHODS = ("zeroshot", "oracle", "moder")


def case_params(case: str, seed: int, overrides: str) -> Params:
    """conf/ composed with the case's preset, the seed and space-separated Hydra overrides (as `dvc exp run -S`)."""
    settings = [f"benchmark={case}", f"seed={seed}", *overrides.split()]
    return parse_params(compose_data(Path("conf"), settings), " ".join(settings))


def digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_case(params: Params, out: Path) -> dict[str, dict[str, float]]:
    """The pipeline's stages for one case, each skipped when its cached output exists; the metrics per method."""
    p = params.model_dump(mode="json")
    key = digest(p["seed"], p["model"], p["world"], p["pretrain"])
    model = out / "backbone" / key / "clip.safetensors"
    if not model.exists():
        backbone(params, model, model.with_suffix(".json"))
    key = digest(key, p["templates"], p["extract"], p["datasets"])
    features = out / "features" / key
    for dataset in params.datasets:
        if not (features / dataset).exists():
            extract(params, dataset, model, features / dataset)
    key = digest(key, p["expert"], p["train"], p["composition"]["alpha"], p["tasks"])
    experts = out / "experts" / key
    for dataset in params.datasets:
        if not (experts / dataset).exists():
            train(params, dataset, model, features, experts / dataset)
    key = digest(key, p["retrieval"], p["composition"], p["benchmark"])
    tasks = list(params.tasks)
    matrices = {method: np.zeros((len(tasks), len(tasks))) for method in METHODS}
    for step in tasks:
        hub_index = out / "hub" / key / f"{step}.parquet"
        if not hub_index.exists():
            hub(params, step, model, features, experts, hub_index)
        evaluation = evaluate(
            params,
            step,
            model,
            features,
            experts,
            hub_index,
            out / "eval" / key / f"{step}.parquet",
            out / "unseen" / key / f"{step}.parquet",
        )
        for row in evaluation.rows:
            matrices[row.method][tasks.index(row.step), tasks.index(row.task)] = row.accuracy
    return {method: summarize(matrix, params.benchmark.protocol) for method, matrix in matrices.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[100, 101, 102], help="validation seeds")
    parser.add_argument("--cases", nargs="+", default=list(SUITE), help="presets in conf/benchmark/")
    parser.add_argument(
        "--candidate",
        nargs=2,
        action="append",
        metavar=("NAME", "OVERRIDES"),
        required=True,
        help='a name and space-separated Hydra overrides, key=value ("" for conf/ as it is)',
    )
    parser.add_argument("--out", type=Path, default=Path("out/validate"))
    args = parser.parse_args()
    if set(args.seeds) & {0, 1, 2}:
        parser.error("seeds 0-2 are the reported (test) seeds; validate on others")
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    for name, overrides in args.candidate:
        per_case: dict[str, dict[str, list[float]]] = {}
        for case in args.cases:
            deltas: dict[str, list[float]] = {"zeroshot_transfer": [], "transfer": [], "last": [], "oracle_last": []}
            for seed in args.seeds:
                metrics = run_case(case_params(case, seed, overrides), args.out)
                deltas["zeroshot_transfer"].append(metrics["zeroshot"]["transfer"])
                deltas["transfer"].append(metrics["moder"]["transfer"] - metrics["zeroshot"]["transfer"])
                deltas["last"].append(metrics["moder"]["last"] - metrics["zeroshot"]["last"])
                deltas["oracle_last"].append(metrics["oracle"]["last"] - metrics["zeroshot"]["last"])
            per_case[case] = deltas
            per_seed = " ".join(f"{v:+.1f}" for v in deltas["transfer"])
            print(
                f"{name:24s} {case:30s} zero-shot T {statistics.mean(deltas['zeroshot_transfer']):5.1f}  "
                f"dT {statistics.mean(deltas['transfer']):+5.1f} ({per_seed})  "
                f"dL {statistics.mean(deltas['last']):+5.1f}",
                flush=True,
            )
        results[name] = per_case
        transfer = [statistics.mean(d["transfer"]) for d in per_case.values()]
        last = [statistics.mean(d["last"]) for d in per_case.values()]
        print(
            f"{name:24s} {'ALL':30s} dT mean {statistics.mean(transfer):+5.2f} worst {min(transfer):+5.2f}  "
            f"dL mean {statistics.mean(last):+5.2f} worst {min(last):+5.2f}",
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "validation.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
