import subprocess
import sys

import yaml

from moder.demo import run_demo
from moder.params import parse_params

SMALL = {
    "model": {"architecture": "moder-micro-clip"},
    "train": {"epochs": 15, "batch_size": 32, "lr": 0.005},
    "demo": {"colours": ["red", "green", "blue"], "shapes": ["circle", "square", "star"], "samples_per_class": 20},
}


def test_demo_trains_task_one_and_composes_task_two():
    result = run_demo(parse_params(SMALL))
    (trained, zs1, moder1), (unseen, zs2, moder2) = result.rows
    assert trained.startswith("task 1") and unseen.startswith("task 2")
    assert moder1 > zs1 + 10.0
    assert all(0.0 <= value <= 100.0 for value in (zs1, moder1, zs2, moder2))
    assert result.losses[-1] < result.losses[0]
    assert len(result.retrieved) == 5 and all(len(experts) == 3 for _, experts in result.retrieved)
    assert run_demo(parse_params(SMALL)).rows == result.rows  # same seed, same figures


def test_demo_cli_prints_the_summary(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    result = subprocess.run([sys.executable, "-m", "stages.demo", "--params", str(path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "task 1 (trained)" in result.stdout and "task 2 (unseen, composed)" in result.stdout


def test_demo_cli_reports_bad_params(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("retrieval:\n  k: 0\n")
    result = subprocess.run([sys.executable, "-m", "stages.demo", "--params", str(path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "key 'retrieval.k'" in result.stderr
