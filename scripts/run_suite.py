"""The suite as DVC experiments: every case (a preset in conf/benchmark/) over the test seeds, queued and run
`--jobs` at a time, then one seed of the first case again at two threads, then docs/suite.md and docs/suite.csv
from `dvc exp show --json` (scripts/suite_table.py).

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python scripts/run_suite.py --jobs 2   # make suite: 9 cases x seeds 0-4
    python scripts/run_suite.py --table-only    # rewrite docs/suite.md and docs/suite.csv from the experiments run
    python scripts/run_suite.py --resume --jobs 2   # a queue left by a stopped run: restart its workers, wait, table
    python scripts/run_suite.py --variant filing --set retrieval.k=16 --jobs 2 --since <suite's commit>
                                                    # every case and seed again under other settings, compared

Each experiment is queued as `dvc exp run --queue -S benchmark=<case> -S seed=<seed>`: DVC composes its
params.yaml from conf/ (Hydra), the workspace's params.yaml is left alone. Experiments run on the code in
the workspace; the backbone of a seed is pre-trained once and restored from DVC's run cache for the other
cases. On 2 cores, run two experiments at once with one thread each (as `make suite` does): two of PyTorch's
default two-thread processes on two cores run about 2.5x slower than one. CPU float results depend on the
thread count: `<case>-s<seed>-threads2` repeats one run with every stage forced at two threads, and the table
says how far its figures moved. `--variant NAME --set KEY=VALUE ...` queues `<case>-s<seed>-NAME` with those
overrides, and the table compares each with the suite's run of its case and seed (the suite's experiments
must be under --rev or --since).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moder.io import atomic_path  # noqa: E402
from moder.params import ParamsError  # noqa: E402
from scripts.suite_table import SUITE, THREADS  # noqa: E402


def dvc(*args: str, capture: bool = False) -> str:
    done = subprocess.run(["dvc", *args], check=True, text=True, capture_output=capture)
    return done.stdout if capture else ""


Experiment = tuple[str, str, list[str]]  # name, preset in conf/benchmark/, more `dvc exp run -S` overrides


def queue(experiments: list[Experiment]) -> None:
    for name, preset, overrides in experiments:
        settings = [f"benchmark={preset}", *overrides]
        dvc("exp", "run", "--queue", "-n", name, *(arg for override in settings for arg in ("-S", override)))


def workers_missing(status: str, jobs: int) -> int:
    """How many workers `dvc queue status` output shows missing for `jobs` to serve the queue: none unless
    experiments are queued. DVC's workers stop now and then with experiments still queued (one of two did so
    in a suite run, which then ran one experiment at a time). The worker count DVC prints is not reliable
    under load (a busy worker may not answer: "1 active" with two experiments running), so a worker counts
    if either it or an experiment running shows it."""
    if "Queued" not in status:
        return 0
    found = re.search(r"Worker status: (\d+) active, (\d+) idle", status)
    workers = int(found[1]) + int(found[2]) if found else 0
    running = len(re.findall(r"\bRunning\s*$", status, flags=re.MULTILINE))
    return max(jobs - max(workers, running), 0)


def wait_for_queue(jobs: int, poll: float = 20.0) -> None:
    """Until nothing is queued or running in two polls in a row (between two tasks a worker can show
    neither: once the ablation's table was written with experiments still queued); workers missing in two
    polls in a row (not a worker between two tasks) are replaced. A failed experiment is reported by the
    table as left out."""
    quiet = 0
    missing_before = 0
    while quiet < 2:
        time.sleep(poll)
        status = dvc("queue", "status", capture=True)
        quiet = 0 if "Queued" in status or "Running" in status else quiet + 1
        missing = workers_missing(status, jobs)
        if missing and missing_before:
            dvc("queue", "start", "-j", str(min(missing, missing_before)))
            missing = 0
        missing_before = missing


def git_commit(rev: str) -> str:
    return subprocess.run(["git", "rev-parse", rev], check=True, text=True, capture_output=True).stdout.strip()


def commits_back_to(since: str, rev: str) -> int:
    """How many first-parent commits from `rev` back to `since`, both included: what `dvc exp show --rev rev -n`
    must cover to show the experiments of both (a case queued at a later commit than the rest)."""
    ancestor = subprocess.run(["git", "merge-base", "--is-ancestor", since, rev], capture_output=True)
    if ancestor.returncode != 0:
        raise ValueError(f"--since {since} is not an ancestor of {rev}")
    count = subprocess.run(
        ["git", "rev-list", "--count", "--first-parent", f"{since}..{rev}"], check=True, text=True, capture_output=True
    )
    return int(count.stdout) + 1


def run_queued(experiments: list[Experiment], jobs: int) -> str:
    """Queue the experiments, run them `jobs` at a time and wait; returns the commit they hang under, so that
    commits made meanwhile do not hide them from `dvc exp show`."""
    rev = git_commit("HEAD")
    started = time.monotonic()
    queue(experiments)
    dvc("queue", "start", "-j", str(jobs))
    wait_for_queue(jobs)
    print(f"{len(experiments)} experiments in {(time.monotonic() - started) / 60:.0f} min")
    return rev


def run_at_two_threads(case: str, seed: int) -> None:
    """The experiment `<case>-s<seed>-threads2`: that run again in a temporary copy, every stage forced
    (pre-training included) with two threads, to measure how far thread count alone moves the figures."""
    started = time.monotonic()
    settings = [f"benchmark={case}", f"seed={seed}"]
    environment = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    command = ["dvc", "exp", "run", "--temp", "--force", "-n", f"{case}-s{seed}-threads2"]
    subprocess.run([*command, *(arg for item in settings for arg in ("-S", item))], check=True, env=environment)
    print(f"{case} seed {seed} at two threads in {(time.monotonic() - started) / 60:.0f} min")


def write_table(script: list[str], show: str, out: Path) -> None:
    """`out` from a table script fed `dvc exp show --json` output; its complaints passed on, its failure ours."""
    table = subprocess.run([sys.executable, *script], input=show, text=True, capture_output=True)
    sys.stderr.write(table.stderr)
    if table.returncode != 0:
        sys.exit(table.returncode)
    with atomic_path(out) as temporary:
        temporary.write_text(table.stdout)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--cases", nargs="+", default=list(SUITE))
    parser.add_argument("--table-only", action="store_true", help="only rewrite docs/suite.md")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="finish the queue a stopped run left (its workers restarted), then the two-thread repeat and the table",
    )
    parser.add_argument("--jobs", type=int, default=1, help="experiments run at once (dvc queue start -j)")
    parser.add_argument("--variant", help="queue the cases and seeds again as <case>-s<seed>-VARIANT with --set")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="the variant's overrides (-S)")
    parser.add_argument("--out", type=Path, default=Path("docs/suite.md"))
    parser.add_argument("--csv", type=Path, default=Path("docs/suite.csv"), help="every seed's figures")
    parser.add_argument(
        "--rev",
        default="HEAD",
        help="with --table-only or --resume: the commit the experiments were queued on (default: HEAD)",
    )
    parser.add_argument(
        "--since",
        help="with --table-only: also the experiments of the commits from --rev back to this one (first parents), "
        "for a case run at a later commit than the rest",
    )
    args = parser.parse_args()
    if args.variant is not None and not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", args.variant):
        parser.error(f"--variant {args.variant!r}: lower-case letters, digits and single hyphens only")
    if args.variant == THREADS.removeprefix("-"):
        parser.error(f"--variant {args.variant}: the two-thread repeat's name")
    if args.set and not args.variant:
        parser.error("--set needs --variant: the name its experiments are queued under")
    if args.variant and not args.set and not args.table_only:
        parser.error(f"--variant {args.variant} needs --set: the settings it changes")
    if any(item.split("=")[0] in ("seed", "benchmark") for item in args.set):
        parser.error("--set cannot change seed or benchmark: a variant is compared with its case and seed")
    try:
        if args.resume:
            wait_for_queue(args.jobs)
            # the repeat runs on the workspace's commit, and the table reads the experiments under --rev only
            if git_commit("HEAD") == git_commit(args.rev):
                run_at_two_threads(args.cases[0], args.seeds[0])
            else:
                print(f"the two-thread repeat left out: the workspace is not at {args.rev}", file=sys.stderr)
        elif args.variant and not args.table_only:
            variant = [
                (f"{case}-s{seed}-{args.variant}", case, [f"seed={seed}", *args.set])
                for case in args.cases
                for seed in args.seeds
            ]
            args.rev = run_queued(variant, args.jobs)
        elif not args.table_only:
            # case-major: the first experiments pre-train each seed's backbone once (in parallel under --jobs),
            # the later ones restore it from DVC's run cache
            suite = [(f"{case}-s{seed}", case, [f"seed={seed}"]) for case in args.cases for seed in args.seeds]
            args.rev = run_queued(suite, args.jobs)
            run_at_two_threads(args.cases[0], args.seeds[0])
        back = ["-n", str(commits_back_to(args.since, args.rev))] if args.since else []
        show = dvc("exp", "show", "--json", "--rev", args.rev, *back, capture=True)
    except (subprocess.CalledProcessError, ParamsError, ValueError) as error:
        sys.exit(f"error: {error}")
    write_table(["scripts/suite_table.py", "--cases", *args.cases, "--csv", str(args.csv)], show, args.out)


if __name__ == "__main__":
    main()
