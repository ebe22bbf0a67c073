"""docs/suite.md and docs/suite.csv from `dvc exp show --json`: per suite case, what MoDER gains over zero-shot
and what that gain is made of (composition's own effect, calibration's, the share of the oracle's headroom),
each as the mean over seeds with its 95% interval, and every method's metrics; the CSV holds every seed's
figures so that each claim can be checked.

    dvc exp show --json | python scripts/suite_table.py --configs conf/benchmark --csv docs/suite.csv > docs/suite.md

Experiments are matched to cases by params.yaml's `benchmark.name`; an experiment without this version's
metrics (failed, still queued, or older) is named on stderr and left out, and a case with no finished seed
is an error. An experiment named `<case>-s<seed>-threads2` is the same run at two threads instead of one
(scripts/run_suite.py --threads-check): it is not a seed of the table, only how far the figures move.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path

from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moder.io import atomic_path  # noqa: E402
from moder.results import METHODS  # noqa: E402

METRICS = ("transfer", "transfer_new", "transfer_recurring", "avg", "last", "future")
EFFECTS = ("composition", "calibration", "headroom")
SUITE = (
    "embedded-mtil",
    "embedded-mtil-own-shifts",
    "embedded-mtil-recurring",
    "embedded-mtil-novel",
    "embedded-mtil-disjoint",
    "embedded-mtil-5shot",
    "embedded-classil",
    "embedded-classil-many-tasks",
    "embedded-classil-few-tasks",
    "embedded-classil-sequential",
)
THREADS = "-threads2"  # the suffix of the experiment that repeats one seed at two threads


class SuiteTableError(ValueError):
    pass


def experiments(nodes: object) -> Iterator[tuple[str, dict]]:
    """(name, data) of every experiment in `dvc exp show --json` output, at any depth (baseline commits
    and the workspace are not experiments: only entries under an `experiments` list count). A queued,
    running or failed experiment (its executor's state says so) has data that are not its results: it
    comes with none. One run from the queue keeps an executor in state "success"."""
    if isinstance(nodes, list):
        for node in nodes:
            yield from experiments(node)
    elif isinstance(nodes, dict):
        for executor in nodes.get("experiments") or []:
            for rev in executor.get("revs") or []:
                state = (executor.get("executor") or {}).get("state")
                data = rev.get("data") or {} if state in (None, "success") else {}
                yield rev.get("name") or rev.get("rev", "?"), data
                yield from experiments(rev)


def file_data(data: dict, kind: str, name: str) -> dict:
    return ((data.get(kind) or {}).get(name) or {}).get("data") or {}


Runs = dict[str, dict[int, dict]]  # case -> seed -> metrics.json


def collect(show: object, cases: tuple[str, ...]) -> tuple[Runs, dict[str, tuple[int, dict]], list[str]]:
    """{case: {seed: metrics}}, the two-thread repeats {case: (seed, metrics)}, and the names of experiments
    left out (no metrics of this version)."""
    runs: Runs = {case: {} for case in cases}
    threads: dict[str, tuple[int, dict]] = {}
    skipped = []
    for name, data in experiments(show):
        params, metrics = file_data(data, "params", "params.yaml"), file_data(data, "metrics", "metrics.json")
        case = (params.get("benchmark") or {}).get("name")
        if case not in runs:
            continue
        seed = params.get("seed")
        if not isinstance(seed, int) or not all(isinstance(metrics.get(m), dict) for m in (*METHODS, *EFFECTS)):
            skipped.append(name)
            continue
        if name.endswith(THREADS):
            threads[case] = (seed, metrics)
            continue
        if seed in runs[case]:
            raise SuiteTableError(f"two experiments of {case} with seed {seed} (one is {name}): remove one")
        runs[case][seed] = metrics
    missing = [case for case, seeds in runs.items() if not seeds]
    if missing:
        raise SuiteTableError(f"no finished experiment for {', '.join(missing)}")
    return runs, threads, skipped


def value(metrics: dict, group: str, key: str) -> float | None:
    """metrics[group][key] (a method's figure or an effect); None where the run has none (no recurring name)."""
    found = (metrics.get(group) or {}).get(key)
    if found is None:
        return None
    if not isinstance(found, int | float) or not math.isfinite(found):
        raise SuiteTableError(f"{group}.{key} is {found!r}, not a finite number")
    return float(found)


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def gain(metrics: dict, metric: str) -> float | None:
    """MoDER minus zero-shot in one run."""
    return _difference(value(metrics, "moder", metric), value(metrics, "zeroshot", metric))


def interval(values: list[float]) -> tuple[float, float | None]:
    """The mean and the half-width of its 95% interval (Student's t, n - 1 degrees of freedom); None for n = 1."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, None
    return mean, float(stats.t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))


def cell(values: list[float | None], difference: bool = True, scale: float = 1.0, digits: int = 1) -> str:
    """mean ± half-width; a difference in bold where its interval excludes 0; '-' unless every seed has it."""
    if not values or any(v is None for v in values):
        return "-"
    mean, half = interval([scale * v for v in values if v is not None])
    sign = "+" if difference else ""
    text = f"{mean:{sign}.{digits}f}" + ("" if half is None else f" ± {half:.{digits}f}")
    return f"**{text}**" if difference and half is not None and abs(mean) > half else text


def purpose(preset: Path) -> str:
    """The preset's leading comment lines, joined."""
    lines = []
    for line in preset.read_text().splitlines():
        if not line.startswith("#"):
            break
        if "@package" not in line:  # Hydra's directive, not prose
            lines.append(line.lstrip("#").strip())
    return " ".join(lines) or "(no description in the preset)"


def threads_note(runs: Runs, threads: dict[str, tuple[int, dict]]) -> list[str]:
    """How far one seed's figures moved at two threads instead of one."""
    notes = []
    for case, (seed, repeat) in threads.items():
        one = runs.get(case, {}).get(seed)
        if one is None:
            continue
        moves = [
            (what, a, b)
            for what, a, b in (
                ("MoDER − zero-shot Transfer", gain(one, "transfer"), gain(repeat, "transfer")),
                ("on new names", gain(one, "transfer_new"), gain(repeat, "transfer_new")),
                (
                    "composition's effect",
                    value(one, "composition", "transfer"),
                    value(repeat, "composition", "transfer"),
                ),
                ("MoDER − zero-shot Last", gain(one, "last"), gain(repeat, "last")),
            )
            if a is not None and b is not None
        ]
        notes.append(
            f"The same run at 2 threads instead of 1 ({case}, seed {seed}, everything recomputed, pre-training "
            "included) moved: " + "; ".join(f"{what} {a:+.2f} → {b:+.2f}" for what, a, b in moves) + "."
        )
    return notes


def render(runs: Runs, threads: dict[str, tuple[int, dict]], configs: Path) -> str:
    seeds_used = sorted({seed for seeds in runs.values() for seed in seeds})
    not_run = [case for case in SUITE if case not in runs]
    out = [
        f"# The suite: MoDER on {len(runs)} embedded cases",
        "",
        "Generated by `make suite` (scripts/suite_table.py from `dvc exp show --json`); do not edit by hand.",
        *([f"Cases of the suite not run for this table: {', '.join(not_run)}."] if not_run else []),
        f"Test seeds {', '.join(map(str, seeds_used))}; how the defaults were chosen is in docs/validation.md.",
        "A cell is the mean over seeds ± the half-width of its 95% interval (Student's t, n − 1); a difference",
        "is **bold** where its interval excludes 0. Every seed's figures: docs/suite.csv. CPU float results",
        "differ across CPUs and thread counts; `make suite` runs two experiments at a time with one thread each.",
        *threads_note(runs, threads),
        "",
        "The worlds share the 64 classes of one embedded world (8 colours × 8 shapes) and, per seed, one",
        "pre-trained tiny CLIP; they differ in which classes each dataset draws, the shifts and the task cuts",
        "(embedded-mtil-5shot is embedded-mtil's world trained on 5 of its 32 images per class).",
        "New names: classes whose name no step so far has trained, in any dataset; recurring: the others.",
        "",
        "## What MoDER gains over zero-shot",
        "",
        "| case | seeds | zero-shot Transfer (min-max) | Transfer | Transfer, new names | Transfer, recurring | Avg "
        "| Last |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, seeds in runs.items():
        zeroshot = [value(m, "zeroshot", "transfer") or 0.0 for m in seeds.values()]
        gains = [cell([gain(m, metric) for m in seeds.values()]) for metric in METRICS[:5]]
        out.append(
            f"| {case} | {', '.join(map(str, sorted(seeds)))} | {min(zeroshot):.1f}-{max(zeroshot):.1f} | "
            + " | ".join(gains)
            + " |"
        )
    out += [
        "",
        "## What the gain is made of",
        "",
        "Composition: MoDER minus MoDER without composition (the classes not yet trained keep their zero-shot",
        "prototypes; own experts, smoothing and calibration unchanged). Calibration: MoDER minus MoDER scored",
        "without calibration. Headroom taken: (MoDER − zero-shot) / (oracle − zero-shot) on Transfer, and",
        "(MoDER − MoDER without composition) / (oracle − MoDER without composition) for composition alone, in",
        "percent. At the last step every class uses its own expert, so MoDER's Last is the oracle's and",
        "MoDER-without-composition's: Last measures own experts, not composition.",
        "",
        "| case | composition: Transfer | composition: new names | calibration: Transfer | calibration: new names "
        "| headroom taken | headroom taken, composition alone | oracle − zero-shot Transfer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, seeds in runs.items():
        runs_ = list(seeds.values())
        out.append(
            f"| {case} | "
            + " | ".join(
                [
                    cell([value(m, "composition", "transfer") for m in runs_]),
                    cell([value(m, "composition", "transfer_new") for m in runs_]),
                    cell([value(m, "calibration", "transfer") for m in runs_]),
                    cell([value(m, "calibration", "transfer_new") for m in runs_]),
                    cell([value(m, "headroom", "moder") for m in runs_], False, 100.0, 0),
                    cell([value(m, "headroom", "composition") for m in runs_], False, 100.0, 0),
                    cell(
                        [_difference(value(m, "oracle", "transfer"), value(m, "zeroshot", "transfer")) for m in runs_]
                    ),
                ]
            )
            + " |"
        )
    for case, seeds in runs.items():
        runs_ = list(seeds.values())
        metrics = [m for m in METRICS if all(value(s, "zeroshot", m) is not None for s in runs_)]
        out += ["", f"## {case}", "", purpose(configs / f"{case}.yaml"), ""]
        out += ["| method | " + " | ".join(_title(m) for m in metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
        for method in METHODS:
            out.append(
                f"| {method} | " + " | ".join(cell([value(s, method, m) for s in runs_], False) for m in metrics) + " |"
            )
        out.append("| MoDER − zero-shot | " + " | ".join(cell([gain(s, m) for s in runs_]) for m in metrics) + " |")
    return "\n".join(out) + "\n"


def _title(metric: str) -> str:
    return {"transfer_new": "Transfer, new names", "transfer_recurring": "Transfer, recurring"}.get(
        metric, metric.capitalize()
    )


def per_seed_csv(runs: Runs, threads: dict[str, tuple[int, dict]]) -> str:
    """One row per experiment (case, seed, threads) with every figure of its metrics.json, dotted keys as columns."""
    rows = [(case, seed, 1, metrics) for case, seeds in runs.items() for seed, metrics in sorted(seeds.items())]
    rows += [(case, seed, 2, metrics) for case, (seed, metrics) in threads.items()]
    columns = list(
        dict.fromkeys(
            f"{group}.{key}"
            for *_, metrics in rows
            for group in (*METHODS, *EFFECTS)
            for key in (metrics.get(group) or {})
        )
    )
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["case", "seed", "threads", *columns])
    for case, seed, count, metrics in rows:
        found = [(metrics.get(c.split(".")[0]) or {}).get(c.split(".", 1)[1]) for c in columns]
        writer.writerow([case, seed, count, *("" if v is None else v for v in found)])
    return text.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=Path, default=Path("conf/benchmark"), help="where the presets are")
    parser.add_argument("--cases", nargs="+", default=list(SUITE))
    parser.add_argument("--csv", type=Path, help="also write every seed's figures here")
    args = parser.parse_args()
    try:
        runs, threads, skipped = collect(json.load(sys.stdin), tuple(args.cases))
        table = render(runs, threads, args.configs)
    except (SuiteTableError, json.JSONDecodeError, OSError) as error:
        sys.exit(f"error: {error}")
    for name in skipped:
        print(f"left out {name}: no metrics of this version (failed, not run, or older)", file=sys.stderr)
    if args.csv is not None:
        with atomic_path(args.csv) as temporary:
            temporary.write_text(per_seed_csv(runs, threads))
    sys.stdout.write(table)


if __name__ == "__main__":
    main()
