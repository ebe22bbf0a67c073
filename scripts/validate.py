"""Choose defaults on validation worlds: MoDER's gains for candidate settings, over suite cases and seeds.

Validation seeds draw other worlds than the reported ones (the seed draws each dataset's classes, the tint
directions, the images and every initialisation), so a setting chosen here is reported on seeds and images
that played no part in the choice (`make suite`, seeds 0-4). Runs the stages dvc.yaml describes, up to every
`evaluate@<step>`, in this process (flows/runner.py: a DVC experiment per candidate would spend most of its
time starting Python), through the Prefect flow's content-addressed store (keys: params slice, code and
inputs), so candidates that differ only in retrieval or composition re-run only the hub and evaluation, and
a flow run finds what validation made.

    python scripts/validate.py --seeds 100 101 102 \\
        --candidate committed "" --candidate gated "retrieval.gate=0.9 composition.alpha_unseen=0.5"

Prints one row per candidate and case (means over seeds): MoDER - zero-shot Transfer (dT) and over new names
(dT_new), composition's own effect (MoDER - MoDER without composition) on both (comp, comp_new; per seed too)
and MoDER - zero-shot Last (dL); then the mean over cases and the worst case; writes the per-seed figures as
JSON to --json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flows.graph import pipeline  # noqa: E402
from flows.runner import run_graph  # noqa: E402
from flows.store import DEFAULT_STORE, Store  # noqa: E402
from moder.params import Params, parse_params  # noqa: E402
from moder.results import METHODS, AccuracyRow, accuracy_matrices, effects, method_figures  # noqa: E402
from scripts.suite_table import SUITE  # noqa: E402
from stages.compose import compose_data  # noqa: E402

VALIDATION_SEEDS = [100, 101, 102, 103, 104]


def case_params(case: str, seed: int, overrides: str) -> Params:
    """conf/ composed with the case's preset, the seed and space-separated Hydra overrides (as `dvc exp run -S`)."""
    settings = [f"benchmark={case}", f"seed={seed}", *overrides.split()]
    return parse_params(compose_data(Path("conf"), settings), " ".join(settings))


def run_case(params: Params, store: Store) -> dict[str, dict[str, float]]:
    """dvc.yaml's stages up to every evaluation, through the store; each method's figures and the effects."""
    calls = pipeline(Path("dvc.yaml"), params.model_dump(mode="json"))
    evaluations = [f"evaluate@{step}" for step in params.tasks]
    records = run_graph(calls, params, store, evaluations)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for label in evaluations:
            store.materialise(records[label], Path(scratch), label)
        for table in Path(scratch).rglob("eval/*.parquet"):
            rows += [AccuracyRow(**row) for row in pq.read_table(table).to_pylist()]
    matrices = accuracy_matrices(rows, list(params.tasks))
    scored = [method for method in METHODS if (method, "all") in matrices]  # the finetune baseline is not run here
    figures = {method: method_figures(matrices, method, params.benchmark.protocol) for method in scored}
    return {**figures, **effects(figures)}


# what each candidate is judged on, per case (mean over seeds): MoDER - zero-shot Transfer, over all images and
# over new names; composition's own effect (MoDER - MoDER without composition) on both; MoDER - zero-shot Last
FIGURES = {
    "dT": lambda m: m["moder"]["transfer"] - m["zeroshot"]["transfer"],
    "dT_new": lambda m: m["moder"]["transfer_new"] - m["zeroshot"]["transfer_new"],
    "comp": lambda m: m["composition"]["transfer"],
    "comp_new": lambda m: m["composition"]["transfer_new"],
    "dL": lambda m: m["moder"]["last"] - m["zeroshot"]["last"],
}


def validation_parser(description: str, json: Path) -> argparse.ArgumentParser:
    """The arguments of every script that reads validation worlds (this one, scripts/headroom.py): the seeds,
    the suite cases, the flow's store and where every seed's figures go."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=VALIDATION_SEEDS, help="validation seeds")
    parser.add_argument("--cases", nargs="+", default=list(SUITE), help="presets in conf/benchmark/")
    parser.add_argument("--store", default=DEFAULT_STORE, help=f"the flow's store, a cache here ({DEFAULT_STORE})")
    parser.add_argument("--json", type=Path, default=json, help="every seed's figures")
    return parser


def parse_validation_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The command line, refused where it names a test seed."""
    args = parser.parse_args()
    if set(args.seeds) & set(range(5)):
        parser.error("seeds 0-4 are the reported (test) seeds; validate on others")
    return args


def main() -> None:
    parser = validation_parser(__doc__, Path("out/validation.json"))
    parser.add_argument(
        "--candidate",
        nargs=2,
        action="append",
        metavar=("NAME", "OVERRIDES"),
        required=True,
        help='a name and space-separated Hydra overrides, key=value ("" for conf/ as it is)',
    )
    args = parse_validation_args(parser)
    store = Store(args.store)
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    for name, overrides in args.candidate:
        per_case: dict[str, dict[str, list[float]]] = {}
        for case in args.cases:
            found: dict[str, list[float]] = {"zeroshot_transfer": [], **{figure: [] for figure in FIGURES}}
            for seed in args.seeds:
                metrics = run_case(case_params(case, seed, overrides), store)
                found["zeroshot_transfer"].append(metrics["zeroshot"]["transfer"])
                for figure, of in FIGURES.items():
                    found[figure].append(of(metrics))
            per_case[case] = found
            print(
                f"{name:24s} {case:30s} zero-shot T {statistics.mean(found['zeroshot_transfer']):5.1f}  "
                + "  ".join(
                    f"{figure} {statistics.mean(found[figure]):+5.1f}"
                    + (f" ({' '.join(f'{v:+.1f}' for v in found[figure])})" if figure == "comp_new" else "")
                    for figure in FIGURES
                ),
                flush=True,
            )
        results[name] = per_case
        means = {figure: [statistics.mean(d[figure]) for d in per_case.values()] for figure in FIGURES}
        print(
            f"{name:24s} {'ALL':30s} "
            + "  ".join(
                f"{figure} mean {statistics.mean(v):+5.2f} worst {min(v):+5.2f}" for figure, v in means.items()
            ),
            flush=True,
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
