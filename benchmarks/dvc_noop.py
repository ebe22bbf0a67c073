"""`dvc repro` with nothing to do, in this project (target <= 5 s), against the same command with DVC's YAML read
by ruamel.yaml's pure-Python parser (the baseline: what DVC does when ruamel.yaml.clib is not installed).

Run from the repository root after a `make run` (every stage up to date). Each run is timed as a whole process:
wall time and the CPU time of the process and its children (the `scan` stage runs every time: always_changed).
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

# DVC started through this, with ruamel.yaml's C extension hidden: ruamel falls back to its pure-Python parser
PURE_YAML = "import sys; sys.modules['_ruamel_yaml'] = None; from dvc.cli import main; sys.exit(main(['repro']))"


def timed(command: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds (user + system, children included) of one run of `command`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0 or "Running stage 'scan'" not in done.stdout:
        sys.exit(f"error: {' '.join(command)} failed or did other work:\n{done.stdout}{done.stderr}")
    if any(line.startswith("Running stage") and "'scan'" not in line for line in done.stdout.splitlines()):
        sys.exit(f"error: not a no-op: a stage other than scan ran; run `make run` first\n{done.stdout}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    binary = Path(sys.executable).parent
    os.environ["PATH"] = f"{binary}{os.pathsep}{os.environ['PATH']}"  # the stages run with this environment's python
    runs = {
        "baseline, pure-Python YAML": [sys.executable, "-c", PURE_YAML],
        "with ruamel.yaml.clib     ": [str(binary / "dvc"), "repro"],
    }
    print(f"dvc repro with nothing to do, {os.cpu_count()} CPUs, median of 5 (after 1 warm-up)")
    medians = {}
    for name, command in runs.items():
        timed(command)
        figures = [timed(command) for _ in range(5)]
        medians[name] = statistics.median(wall for wall, _ in figures)
        cpu = statistics.median(cpu for _, cpu in figures)
        print(f"  {name}: {medians[name]:5.2f} s wall, {cpu:5.2f} s CPU")
    baseline, clib = medians.values()
    print(f"  speed-up: {baseline / clib:.2f}x   (target: <= 5 s wall)")


if __name__ == "__main__":
    main()
