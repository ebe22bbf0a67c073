"""scripts/suite_table.py on hand-made `dvc exp show --json` output."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts.suite_table import SuiteTableError, collect, render  # noqa: E402


def _metrics(zeroshot: float, moder: float) -> dict:
    row = lambda v: {"transfer": v, "avg": v + 1, "last": v + 2}  # noqa: E731
    return {"zeroshot": row(zeroshot), "finetune": row(10.0), "oracle": row(90.0), "moder": row(moder)}


def _experiment(name: str, case: str, seed: int, metrics: dict | None) -> dict:
    data = {"params": {"params.yaml": {"data": {"seed": seed, "benchmark": {"name": case}}}}}
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
            _experiment("b-s0", "b", 0, _metrics(30.0, 29.0)),
            _experiment("b-s1", "b", 1, None),
            _experiment("other", "not-in-suite", 0, _metrics(0.0, 0.0)),
        ],
    },
]


def test_means_spreads_and_deltas_per_case(tmp_path):
    (tmp_path / "a.yaml").write_text("# Case a: shared shifts.\n# Two lines.\nbenchmark: {}\n")
    (tmp_path / "b.yaml").write_text("benchmark: {}\n")
    runs, skipped = collect(SHOW, ("a", "b"))
    assert sorted(runs["a"]) == [0, 1] and sorted(runs["b"]) == [0]  # the workspace is not an experiment
    assert skipped == ["b-s1"]
    table = render(runs, tmp_path)
    assert "| a | 0, 1 | 40.0-50.0 | +3.0 ± 1.4 | +3.0 ± 1.4 | +3.0 ± 1.4 |" in table
    assert "| b | 0 | 30.0-30.0 | -1.0 ± 0.0 | -1.0 ± 0.0 | -1.0 ± 0.0 |" in table
    assert "Case a: shared shifts. Two lines." in table
    assert "| moder | 48.0 ± 5.7 | 49.0 ± 5.7 | 50.0 ± 5.7 |" in table
    assert "| MoDER − zero-shot | 3.0 ± 1.4 | 3.0 ± 1.4 | 3.0 ± 1.4 |" in table
    assert "(no description in the preset)" in table


def test_a_case_without_a_finished_experiment_is_an_error():
    with pytest.raises(SuiteTableError, match="no finished experiment for c"):
        collect(SHOW, ("a", "c"))


def test_duplicate_seeds_and_non_finite_metrics_are_refused(tmp_path):
    twice = [
        {"experiments": [_experiment("x", "a", 0, _metrics(1.0, 1.0)), _experiment("y", "a", 0, _metrics(1.0, 1.0))]}
    ]
    with pytest.raises(SuiteTableError, match="two experiments of a with seed 0"):
        collect(twice, ("a",))
    (tmp_path / "a.yaml").write_text("benchmark: {}\n")
    bad = _metrics(1.0, 1.0)
    bad["moder"]["last"] = float("nan")
    runs, _ = collect([{"experiments": [_experiment("x", "a", 0, bad)]}], ("a",))
    with pytest.raises(SuiteTableError, match="moder.last is nan"):
        render(runs, tmp_path)


def test_command_line_reads_stdin_and_fails_in_one_line(tmp_path):
    (tmp_path / "a.yaml").write_text("# A.\n")
    script = [sys.executable, str(REPO / "scripts" / "suite_table.py"), "--configs", str(tmp_path)]
    done = subprocess.run([*script, "--cases", "a"], input=json.dumps(SHOW), capture_output=True, text=True, check=True)
    assert done.stdout.startswith("# The suite") and "| a | 0, 1 |" in done.stdout
    failed = subprocess.run([*script, "--cases", "zzz"], input=json.dumps(SHOW), capture_output=True, text=True)
    assert failed.returncode == 1 and failed.stderr.strip() == "error: no finished experiment for zzz"
