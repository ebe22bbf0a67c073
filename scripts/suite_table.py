"""docs/suite.md and docs/suite.csv from `dvc exp show --json`: per suite case, what MoDER gains over zero-shot
and what that gain is made of (composition's own effect, calibration's, the share of the oracle's headroom),
each as the mean over seeds with its 95% interval, and every method's metrics; the CSV holds every seed's
figures so that each claim can be checked.

    dvc exp show --json | python scripts/suite_table.py --configs conf/benchmark --csv docs/suite.csv > docs/suite.md

Experiments are matched to cases by params.yaml's `benchmark.name` and `seed`, and count by name: `<case>-s<seed>`
is a seed of the suite; `<case>-s<seed>-threads2` the same run at two threads instead of one (how far the
figures move, not a seed); `<case>-s<seed>-<variant>` the same case and seed under other settings
(scripts/run_suite.py --variant), compared seed by seed with the suite's run; any other name (the ablation's,
say) is not read. A named experiment without this version's metrics (failed, still queued, or older) is
named on stderr and left out, and a case with no finished seed is an error.
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
from dataclasses import dataclass, field
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


@dataclass
class Suite:
    """What `collect` reads: the suite's runs, the two-thread repeats {case: (seed, metrics)}, the variants
    {variant: {case: {seed: metrics}}}, each variant's settings that differ from the suite's run of the same
    case and seed {variant: {dotted key: (suite's value, variant's value)}}, and the names left out."""

    runs: Runs
    threads: dict[str, tuple[int, dict]] = field(default_factory=dict)
    variants: dict[str, Runs] = field(default_factory=dict)
    settings: dict[str, dict[str, tuple[object, object]]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def flat(params: dict, prefix: str = "") -> dict[str, object]:
    """Nested params as {dotted key: value}."""
    out: dict[str, object] = {}
    for key, item in params.items():
        if isinstance(item, dict):
            out |= flat(item, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = item
    return out


def collect(show: object, cases: tuple[str, ...]) -> Suite:
    """The suite's experiments of `cases` in `dvc exp show --json` output, by name (the module's docstring)."""
    suite = Suite({case: {} for case in cases})
    found: dict[tuple[str, str, int], tuple[str, dict, dict]] = {}  # (variant or "", case, seed) -> name, ...
    for name, data in experiments(show):
        params, metrics = file_data(data, "params", "params.yaml"), file_data(data, "metrics", "metrics.json")
        case, seed = (params.get("benchmark") or {}).get("name"), params.get("seed")
        if case not in suite.runs or not isinstance(seed, int) or not name.startswith(f"{case}-s{seed}"):
            continue
        variant = name.removeprefix(f"{case}-s{seed}")
        if variant and not variant.startswith("-"):
            continue  # another seed's prefix: <case>-s1 of <case>-s10
        variant = variant.removeprefix("-")
        if not all(isinstance(metrics.get(m), dict) for m in (*METHODS, *EFFECTS)):
            suite.skipped.append(name)
            continue
        if (variant, case, seed) in found:
            raise SuiteTableError(f"two experiments of {case} with seed {seed} named {name}: remove one")
        found[variant, case, seed] = (name, params, metrics)
    for (variant, case, seed), (name, params, metrics) in sorted(found.items()):
        if variant == "":
            suite.runs[case][seed] = metrics
        elif "-" + variant == THREADS:
            suite.threads[case] = (seed, metrics)
        elif ("", case, seed) not in found:
            raise SuiteTableError(f"{name} has no suite run of {case} with seed {seed} to be compared with")
        else:
            suite.variants.setdefault(variant, {}).setdefault(case, {})[seed] = metrics
            ours, theirs = flat(found["", case, seed][1]), flat(params)
            keys = sorted(ours.keys() | theirs.keys())
            differing = {k: (ours.get(k), theirs.get(k)) for k in keys if ours.get(k) != theirs.get(k)}
            if suite.settings.setdefault(variant, differing) != differing:
                raise SuiteTableError(
                    f"{name} differs from the suite's run in other settings than the other {variant} runs"
                )
    missing = [case for case, seeds in suite.runs.items() if not seeds]
    if missing:
        raise SuiteTableError(f"no finished experiment for {', '.join(missing)}")
    return suite


def value(metrics: dict, group: str, key: str) -> float | None:
    """metrics[group][key] (a method's figure or an effect); None where the run has none (no recurring name)."""
    found = (metrics.get(group) or {}).get(key)
    if found is None:
        return None
    if not isinstance(found, int | float) or not math.isfinite(found):
        raise SuiteTableError(f"{group}.{key} is {found!r}, not a finite number")
    return float(found)


def subtract(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def paired_moves(ours: dict[int, dict], theirs: dict[int, dict], metric: str) -> list[float | None]:
    """MoDER's `metric` in `ours` minus in `theirs` (seed -> metrics), seed by seed over the seeds both ran."""
    seeds = sorted(ours.keys() & theirs.keys())
    return [subtract(value(ours[s], "moder", metric), value(theirs[s], "moder", metric)) for s in seeds]


def gain(metrics: dict, metric: str) -> float | None:
    """MoDER minus zero-shot in one run."""
    return subtract(value(metrics, "moder", metric), value(metrics, "zeroshot", metric))


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


def variant_section(suite: Suite, variant: str) -> list[str]:
    """The suite's runs against the same case and seed under the variant's settings, seed by seed."""
    settings = suite.settings[variant]
    changed = "; ".join(f"`{key}` {theirs!r} (the suite: {ours!r})" for key, (ours, theirs) in settings.items())
    out = [
        "",
        f"## Against variant `{variant}`",
        "",
        f"Experiments `<case>-s<seed>-{variant}` set {changed or 'nothing else'}. Cells: MoDER in the suite's run",
        "minus MoDER in the variant's of the same case and seed, mean ± 95% interval, then the lowest seed; a pair",
        "with identical zero-shot figures shares its backbone and features. Last column: composition's own effect",
        "on new names within the variant's runs (the suite's is in the table of what the gain is made of).",
        "",
        "| case | seeds | Last | Avg | Transfer | Transfer, new names | lowest seed: Last, Avg | zero-shot identical "
        "| the variant's composition: new names |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case in (case for case in suite.runs if case in suite.variants[variant]):  # the suite's order
        seeds = suite.variants[variant][case]
        pairs = [(suite.runs[case][seed], theirs) for seed, theirs in sorted(seeds.items())]
        moves = {m: paired_moves(suite.runs[case], seeds, m) for m in ("last", "avg", "transfer", "transfer_new")}
        lowest = ", ".join(f"{min(v for v in moves[m] if v is not None):+.2f}" for m in ("last", "avg"))
        same = sum(a["zeroshot"] == b["zeroshot"] for a, b in pairs)
        out.append(
            f"| {case} | {', '.join(map(str, sorted(seeds)))} | "
            + " | ".join(cell(values, digits=2) for values in moves.values())
            + f" | {lowest} | {same} of {len(pairs)} | "
            + cell([value(b, "composition", "transfer_new") for _, b in pairs])
            + " |"
        )
    return out


def render(suite: Suite, configs: Path) -> str:
    runs, threads = suite.runs, suite.threads
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
                    cell([subtract(value(m, "oracle", "transfer"), value(m, "zeroshot", "transfer")) for m in runs_]),
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
    for variant in suite.variants:
        out += variant_section(suite, variant)
    return "\n".join(out) + "\n"


def _title(metric: str) -> str:
    return {"transfer_new": "Transfer, new names", "transfer_recurring": "Transfer, recurring"}.get(
        metric, metric.capitalize()
    )


def per_seed_csv(suite: Suite) -> str:
    """One row per experiment (case, seed, threads, variant: empty for the suite's settings) with every figure
    of its metrics.json, dotted keys as columns."""
    rows = [
        (case, seed, 1, "", metrics) for case, seeds in suite.runs.items() for seed, metrics in sorted(seeds.items())
    ]
    rows += [(case, seed, 2, "", metrics) for case, (seed, metrics) in suite.threads.items()]
    rows += [
        (case, seed, 1, variant, metrics)
        for variant, cases in suite.variants.items()
        for case, seeds in cases.items()
        for seed, metrics in sorted(seeds.items())
    ]
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
    writer.writerow(["case", "seed", "threads", "variant", *columns])
    for case, seed, count, variant, metrics in rows:
        found = [(metrics.get(c.split(".")[0]) or {}).get(c.split(".", 1)[1]) for c in columns]
        writer.writerow([case, seed, count, variant, *("" if v is None else v for v in found)])
    return text.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=Path, default=Path("conf/benchmark"), help="where the presets are")
    parser.add_argument("--cases", nargs="+", default=list(SUITE))
    parser.add_argument("--csv", type=Path, help="also write every seed's figures here")
    args = parser.parse_args()
    try:
        suite = collect(json.load(sys.stdin), tuple(args.cases))
        table = render(suite, args.configs)
    except (SuiteTableError, json.JSONDecodeError, OSError) as error:
        sys.exit(f"error: {error}")
    for name in suite.skipped:
        print(f"left out {name}: no metrics of this version (failed, not run, or older)", file=sys.stderr)
    if args.csv is not None:
        with atomic_path(args.csv) as temporary:
            temporary.write_text(per_seed_csv(suite))
    sys.stdout.write(table)


if __name__ == "__main__":
    main()
