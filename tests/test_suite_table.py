"""scripts/suite_table.py on hand-made `dvc exp show --json` output."""

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts.suite_table import SuiteTableError, cell, collect, flat, interval, per_seed_csv, render  # noqa: E402


def _metrics(zeroshot: float, moder: float, composition: float = 0.5) -> dict:
    row = lambda v: {"transfer": v, "transfer_new": v - 1, "avg": v + 1, "last": v + 2}  # noqa: E731
    metrics = {m: row(v) for m, v in (("zeroshot", zeroshot), ("finetune", 10.0), ("oracle", 90.0), ("moder", moder))}
    metrics |= {"no_composition": row(moder - composition), "no_calibration": row(moder)}
    metrics["composition"] = {"transfer": composition, "transfer_new": composition}
    metrics["calibration"] = {"transfer": 0.0, "transfer_new": 0.0}
    metrics["headroom"] = {"moder": (moder - zeroshot) / (90.0 - zeroshot)}
    return metrics


def _experiment(name: str, case: str, seed: int, metrics: dict | None, k: int = 4) -> dict:
    params = {"seed": seed, "benchmark": {"name": case}, "retrieval": {"k": k, "temperature": 1.0}}
    data = {"params": {"params.yaml": {"data": params}}}
    if metrics is not None:
        data["metrics"] = {"metrics.json": {"data": metrics}}
    return {"executor": None, "name": name, "revs": [{"rev": "abc", "name": name, "data": data, "experiments": None}]}


SHOW = [
    {
        "rev": "workspace",
        "name": None,
        "data": {
            "params": {"params.yaml": {"data": {"seed": 0, "benchmark": {"name": "a"}}}},
            "metrics": {"metrics.json": {"data": _metrics(1.0, 1.0)}},
        },
        "experiments": None,
    },
    {
        "rev": "1234",
        "name": "main",
        "data": {},
        "experiments": [
            _experiment("a-s0", "a", 0, _metrics(40.0, 44.0)),
            _experiment("a-s1", "a", 1, _metrics(50.0, 52.0)),
            _experiment("a-s2", "a", 2, _metrics(45.0, 48.0, composition=-0.5)),
            _experiment("a-s0-threads2", "a", 0, _metrics(41.0, 44.5)),
            _experiment("b-s0", "b", 0, _metrics(30.0, 29.0)),
            _experiment("b-s1", "b", 1, None),
            _experiment("b-s2", "b", 2, {m: {"transfer": 1.0} for m in ("zeroshot", "finetune", "oracle", "moder")}),
            _experiment("other", "not-in-suite", 0, _metrics(0.0, 0.0)),
            _experiment("a-moder-s1", "a", 1, _metrics(0.0, 0.0)),  # the ablation's: not the suite's
            _experiment("a-s10", "a", 1, _metrics(0.0, 0.0)),  # named for another seed: not read
        ],
    },
]


def test_interval_is_students_t_over_the_seeds():
    mean, half = interval([4.0, 2.0, 3.0])  # sd 1, n 3: t(0.975, 2) = 4.303
    assert mean == 3.0 and half == pytest.approx(4.3027 / 3**0.5, abs=1e-4)
    assert interval([1.5]) == (1.5, None)
    assert cell([4.0, 2.0, 3.0]) == "**+3.0 ± 2.5**"  # excludes 0
    assert cell([1.0, -0.5, 0.5]) == "+0.3 ± 1.9"  # does not
    assert cell([4.0, 2.0, 3.0], difference=False) == "3.0 ± 2.5" and cell([1.0, None]) == "-"


def test_gains_effects_and_every_method_per_case(tmp_path):
    (tmp_path / "a.yaml").write_text("# Case a: shared shifts.\n# Two lines.\nbenchmark: {}\n")
    (tmp_path / "b.yaml").write_text("benchmark: {}\n")
    suite = collect(SHOW, ("a", "b"))
    runs, threads = suite.runs, suite.threads
    assert sorted(runs["a"]) == [0, 1, 2] and sorted(runs["b"]) == [0]  # the workspace is not an experiment
    assert runs["a"][1] == _metrics(50.0, 52.0)  # not the ablation's a-moder-s1 nor a-s10
    assert suite.skipped == ["b-s1", "b-s2"] and threads == {"a": (0, _metrics(41.0, 44.5))}
    assert suite.variants == {} and "Against variant" not in (table := render(suite, tmp_path))
    # a: gains 4, 2, 3 -> 3.0 ± 2.5, bold; b: one seed, no interval
    bold = "**+3.0 ± 2.5**"
    assert f"| a | 0, 1, 2 | 40.0-50.0 | {bold} | {bold} | - | {bold} | {bold} |" in table
    assert "| b | 0 | 30.0-30.0 | -1.0 | -1.0 | - | -1.0 | -1.0 |" in table
    # composition 0.5, 0.5, -0.5: its interval includes 0, not bold
    assert "| a | +0.2 ± 1.4 | +0.2 ± 1.4 | +0.0 ± 0.0 | +0.0 ± 0.0 |" in table
    assert "Cases of the suite not run for this table: embedded-mtil, " in table  # a and b stand in for them
    assert "Case a: shared shifts. Two lines." in table and "(no description in the preset)" in table
    assert "| moder | 48.0 ± 9.9 | 47.0 ± 9.9 | 49.0 ± 9.9 | 50.0 ± 9.9 |" in table
    assert (
        "(a, seed 0, everything recomputed, pre-training included) moved: MoDER − zero-shot Transfer +4.00 → +3.50"
        in (table)
    )


def test_per_seed_csv_holds_every_figure_of_every_run():
    rows = list(csv.DictReader(io.StringIO(per_seed_csv(collect(SHOW, ("a", "b"))))))
    assert [(r["case"], r["seed"], r["threads"], r["variant"]) for r in rows] == [
        ("a", "0", "1", ""),
        ("a", "1", "1", ""),
        ("a", "2", "1", ""),
        ("b", "0", "1", ""),
        ("a", "0", "2", ""),
    ]
    assert rows[2]["moder.transfer"] == "48.0" and rows[2]["composition.transfer"] == "-0.5"
    assert rows[0]["headroom.moder"] == str(4.0 / 50.0) and "moder.transfer_recurring" not in rows[0]


def test_a_case_without_a_finished_experiment_is_an_error():
    with pytest.raises(SuiteTableError, match="no finished experiment for c"):
        collect(SHOW, ("a", "c"))


def test_duplicate_seeds_and_non_finite_metrics_are_refused(tmp_path):
    twice = [{"experiments": [_experiment("a-s0", "a", 0, _metrics(1.0, 1.0))]}] * 2  # at two commits
    with pytest.raises(SuiteTableError, match="two experiments of a with seed 0 named a-s0"):
        collect(twice, ("a",))
    (tmp_path / "a.yaml").write_text("benchmark: {}\n")
    bad = _metrics(1.0, 1.0)
    bad["moder"]["last"] = float("nan")
    with pytest.raises(SuiteTableError, match="moder.last is nan"):
        render(collect([{"experiments": [_experiment("a-s0", "a", 0, bad)]}], ("a",)), tmp_path)


def test_command_line_reads_stdin_writes_the_csv_and_fails_in_one_line(tmp_path):
    (tmp_path / "a.yaml").write_text("# A.\n")
    script = [sys.executable, str(REPO / "scripts" / "suite_table.py"), "--configs", str(tmp_path)]
    done = subprocess.run(
        [*script, "--cases", "a", "--csv", str(tmp_path / "suite.csv")],
        input=json.dumps(SHOW),
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.startswith("# The suite") and "| a | 0, 1, 2 |" in done.stdout
    assert (tmp_path / "suite.csv").read_text().startswith("case,seed,threads,variant,moder.transfer,")
    failed = subprocess.run([*script, "--cases", "zzz"], input=json.dumps(SHOW), capture_output=True, text=True)
    assert failed.returncode == 1 and failed.stderr.strip() == "error: no finished experiment for zzz"


def test_a_variant_is_compared_seed_by_seed_with_the_suites_run_of_its_case_and_seed(tmp_path):
    for case in ("a", "b"):
        (tmp_path / f"{case}.yaml").write_text("# A case.\n")
    wide = [
        _experiment("a-s0-wide", "a", 0, _metrics(40.0, 43.0, 4.0), k=16),  # the suite's a-s0: moder 44.0
        _experiment("a-s1-wide", "a", 1, _metrics(50.5, 53.5, 2.0), k=16),  # a-s1: 52.0, another zero-shot
        _experiment("a-s2-wide", "a", 2, _metrics(45.0, 46.0, 3.0), k=16),  # a-s2: 48.0
    ]
    suite = collect([*SHOW, {"experiments": wide}], ("a", "b"))
    assert sorted(suite.runs["a"]) == [0, 1, 2] and suite.runs["a"][0] == _metrics(40.0, 44.0)
    assert suite.variants == {
        "wide": {"a": {0: _metrics(40.0, 43.0, 4.0), 1: _metrics(50.5, 53.5, 2.0), 2: _metrics(45.0, 46.0, 3.0)}}
    }
    assert suite.settings == {"wide": {"retrieval.k": (4, 16)}}
    table = render(suite, tmp_path)
    # the suite minus the variant: +1.0, -1.5, +2.0 on every metric (the fixture moves them together)
    moved = "+0.50 ± 4.48"  # sd 1.80, t(0.975, 2) 4.303 / sqrt 3
    assert "## Against variant `wide`" in table and "set `retrieval.k` 16 (the suite: 4)." in table
    composed = "**+3.0 ± 2.5**"  # the variant's composition on new names, 4, 2, 3 (the suite's: 0.5, 0.5, -0.5)
    assert f"| a | 0, 1, 2 | {moved} | {moved} | {moved} | {moved} | -1.50, -1.50 | 2 of 3 | {composed} |" in table
    rows = list(csv.DictReader(io.StringIO(per_seed_csv(suite))))
    assert [(r["seed"], r["variant"], r["moder.transfer"]) for r in rows if r["variant"]] == [
        ("0", "wide", "43.0"),
        ("1", "wide", "53.5"),
        ("2", "wide", "46.0"),
    ]


def test_a_variant_needs_the_suites_run_and_one_set_of_settings():
    alone = [{"experiments": [_experiment("b-s3-wide", "b", 3, _metrics(1.0, 1.0), k=16)]}]
    with pytest.raises(SuiteTableError, match="b-s3-wide has no suite run of b with seed 3 to be compared with"):
        collect([*SHOW, *alone], ("a", "b"))
    mixed = [_experiment("a-s0-wide", "a", 0, _metrics(1.0, 1.0), k=16)]
    mixed.append(_experiment("a-s1-wide", "a", 1, _metrics(1.0, 1.0), k=8))
    with pytest.raises(SuiteTableError, match="a-s1-wide differs from the suite's run in other settings"):
        collect([*SHOW, {"experiments": mixed}], ("a", "b"))
    assert flat({"a": {"b": 1, "c": {"d": None}}, "e": [1]}) == {"a.b": 1, "a.c.d": None, "e": [1]}
