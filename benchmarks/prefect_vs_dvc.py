"""Wall time of the embedded pipeline through the Prefect flow vs through `dvc repro`, and of a cached re-run.

Both run from scratch in a fresh copy of the project (no DVC cache, an empty artifact store), on the
committed params.yaml, one after the other on the same machine. The flow talks to a Prefect
server started here on loopback, as a deployment would. Target: Prefect / DVC <= 1.2.

    .venv/bin/python benchmarks/prefect_vs_dvc.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flows.local_server import local_server

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def timed(command: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="moder-bench-") as scratch:
        root = Path(scratch) / "project"
        root.mkdir()
        for name in ("dvc.yaml", "params.yaml", "moder", "stages", "flows", "conf"):
            source = REPO / name
            shutil.copytree(source, root / name) if source.is_dir() else shutil.copy(source, root / name)
        (root / ".gitignore").write_text("/data/\n/out/\n")
        env = {
            **os.environ,
            "PATH": f"{BIN}:{os.environ['PATH']}",
            "DVC_NO_ANALYTICS": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        for command in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):
            subprocess.run(command, cwd=root, env=env, check=True)
        shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots")

        dvc_seconds = timed([str(BIN / "dvc"), "repro"], root, env)
        with local_server(Path(scratch) / "prefect-home") as client_env:
            env = {**env, **client_env}
            # from scratch: nothing of what `dvc repro` just made is offered to the flow's store
            flow = [sys.executable, "-m", "flows.pipeline", "--params", "params.yaml", "--no-offer"]
            prefect_seconds = timed(flow + ["--out", "out/first"], root, env)
            cached_seconds = timed(flow + ["--out", "out/cached"], root, env)
        same = all(
            json.loads((root / d / "metrics.json").read_text()) == json.loads((root / "metrics.json").read_text())
            for d in ("out/first", "out/cached")
        )

    print(f"dvc repro (baseline)        {dvc_seconds:7.1f} s")
    print(
        f"Prefect flow, from scratch  {prefect_seconds:7.1f} s   "
        f"ratio {prefect_seconds / dvc_seconds:.2f} (target <= 1.2)"
    )
    print(f"Prefect flow, fully cached  {cached_seconds:7.1f} s")
    print(f"metrics.json identical across the three runs: {same}")


if __name__ == "__main__":
    main()
