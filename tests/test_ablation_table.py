"""scripts/ablation_table.py on hand-made `dvc exp show --json` output."""

import importlib.util
import json
import subprocess
import sys

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("ablation_table", REPO / "scripts" / "ablation_table.py")
ablation_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablation_table)


def _exp(name: str, sequence: str, moder_last: float, executor=None, timestamp="2026-11-25T04:00:00") -> dict:
    metrics = {m: {"transfer": 40.0, "avg": 45.0, "last": 50.0} for m in ("zeroshot", "finetune", "oracle")}
    metrics["moder"] = {"transfer": 42.0, "avg": 55.0, "last": moder_last}
    data = {
        "timestamp": timestamp,
        "params": {"params.yaml": {"data": {"benchmark": {"name": sequence}}}},
        "metrics": {"metrics.json": {"data": metrics}},
    }
    return {
        "executor": executor,
        "name": name,
        "revs": [{"rev": "abc", "name": name, "data": data, "experiments": None}],
    }


SHOW = [
    {"rev": "workspace", "name": None, "data": {}, "experiments": None},
    {
        "rev": "123",
        "name": "main",
        "data": {},
        "experiments": [
            _exp("embedded-mtil-moder-s0", "embedded-mtil", 60.0, executor={"state": "success", "name": "dvc-task"}),
            _exp("embedded-mtil-moder-s1", "embedded-mtil", 70.0, timestamp="2026-11-25T05:00:00"),
            _exp("embedded-mtil-moder-s1", "embedded-mtil", 10.0),  # the same row and seed run earlier: superseded
            _exp("embedded-mtil-moder-s2", "embedded-mtil", 99.0, executor={"state": "running"}),  # not finished
            _exp("embedded-mtil-no-anchors-s0", "embedded-classil", 10.0),  # name and params disagree: skipped
            _exp("unrelated", "embedded-mtil", 1.0),
            _exp("embedded-mtil-no-smoothing-s0", "embedded-mtil", 66.0),
            _exp("embedded-mtil-no-smoothing-s1", "embedded-mtil", 72.0),
        ],
    },
]


def test_rows_average_over_seeds_and_skip_unfinished_or_mismatched_experiments():
    table, skipped = ablation_table.collect(SHOW)
    assert skipped == ["embedded-mtil-moder-s2", "embedded-mtil-no-anchors-s0"]
    assert set(table) == {"embedded-mtil"} and set(table["embedded-mtil"]) == {"moder", "no-smoothing"}
    assert sorted(table["embedded-mtil"]["moder"]) == [0, 1]
    text = ablation_table.markdown(table)
    assert "## embedded-mtil (seeds 0, 1)" in text
    moder = next(line for line in text.splitlines() if line.startswith("| moder: moder"))
    # Last: mean of 60 and 70 with the half-width of its 95% interval (t, 1 degree of freedom: 12.706 * 5);
    # deltas against zero-shot's 50, bold where the interval excludes 0
    assert "| 65.0 ± 63.5 |" in moder and moder.endswith("| **+2.0 ± 0.0** | **+10.0 ± 0.0** | +15.0 ± 63.5 |")
    assert "| zeroshot | 40.0 ± 0.0 | 45.0 ± 0.0 | 50.0 ± 0.0 |" in text
    # paired with the defaults seed by seed: Last 66 - 60, 72 - 70 -> +4.0 ± 12.706 * 2; the spread between
    # the seeds' levels (60 against 70) does not widen it
    assert "| no-smoothing | 0, 1 | +0.0 ± 0.0 | +0.0 ± 0.0 | +4.0 ± 25.4 |" in text


def test_rows_know_their_overrides_and_the_cli_refuses_a_non_finite_metric():
    assert ablation_table.ROWS["no-anchors"][2] == ["train.anchor_earlier=0"]
    assert all(row[1] for row in ablation_table.ROWS.values())
    bad = json.loads(json.dumps(SHOW[:2]))
    bad[1]["experiments"] = [_exp("embedded-mtil-moder-s0", "embedded-mtil", float("nan"))]
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "ablation_table.py")],
        input=json.dumps(bad),
        text=True,
        capture_output=True,
    )
    assert done.returncode == 1 and done.stderr.strip() == "error: moder.last is nan, not a finite number"
