"""scripts/run_suite.py's replacement of stopped queue workers, on `dvc queue status` output as DVC prints it."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import scripts.run_suite as run_suite  # noqa: E402
from scripts.run_suite import workers_missing  # noqa: E402

HEADER = "Task     Name                            Created    Status\n"


def status(rows: list[str], active: int, idle: int) -> str:
    return HEADER + "".join(f"{row}\n" for row in rows) + f"\nWorker status: {active} active, {idle} idle\n"


def test_a_stopped_worker_is_replaced_while_experiments_are_queued():
    one_running = [
        "0c6fa98  embedded-mtil-own-shifts-s1     07:17 AM   Running",
        "aaa5ccb  embedded-mtil-s2                07:17 AM   Queued",
    ]
    assert workers_missing(status(one_running, 1, 0), jobs=2) == 1
    assert workers_missing(status(one_running, 0, 0), jobs=2) == 2 - 1  # the experiment running has a worker
    assert workers_missing(status(one_running, 1, 1), jobs=2) == 0  # an idle worker takes the next task itself
    assert workers_missing(status(one_running, 2, 0), jobs=2) == 0
    assert workers_missing(status(one_running[1:], 0, 0), jobs=2) == 2


def test_two_experiments_running_count_two_workers_whatever_dvc_says_of_them():
    rows = [
        "8d0c40a  embedded-mtil-s0                10:07 AM   Running",
        "c9dd207  embedded-mtil-s1                10:07 AM   Running",
        "b16d976  embedded-mtil-s2                10:07 AM   Queued",
    ]
    assert workers_missing(status(rows, 1, 0), jobs=2) == 0  # seen under load: a busy worker did not answer


def test_no_worker_is_started_when_nothing_is_queued():
    running = ["8d0c40a  embedded-mtil-s0                10:07 AM   Running"]
    assert workers_missing(status(running, 1, 0), jobs=2) == 0
    assert workers_missing(status(["700e8a4  embedded-mtil-s0  07:17 AM   Success"], 0, 0), jobs=2) == 0


def test_a_status_without_the_worker_line_counts_no_worker():
    assert workers_missing(HEADER + "aaa5ccb  embedded-mtil-s2  07:17 AM   Queued\n", jobs=2) == 2


def test_workers_are_started_only_when_missing_in_two_polls_in_a_row(monkeypatch):
    queued = "aaa5ccb  embedded-mtil-s2                07:17 AM   Queued"
    running = "8d0c40a  embedded-mtil-s0                10:07 AM   Running"
    polls = iter(
        [
            status([running, running, queued], 2, 0),
            status([running, queued], 1, 0),  # a worker between two tasks: one poll only
            status([running, running, queued], 2, 0),
            status([running, queued], 1, 0),  # a worker that stopped: two polls
            status([running, queued], 1, 0),
            status([running, running], 2, 0),
            status([], 0, 0),
            status([], 0, 0),
        ]
    )
    started = []

    def fake_dvc(*args, capture=False):
        if args[:2] == ("queue", "status"):
            return next(polls)
        started.append(args)
        return ""

    monkeypatch.setattr(run_suite, "dvc", fake_dvc)
    monkeypatch.setattr(run_suite.time, "sleep", lambda seconds: None)
    run_suite.wait_for_queue(2)
    assert started == [("queue", "start", "-j", "1")]


def test_the_table_reaches_back_to_a_given_commit_along_first_parents_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], check=True, text=True, capture_output=True).stdout.strip()

    git("init", "-q", "-b", "main")
    commits = []
    for n in range(3):
        git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", f"c{n}")
        commits.append(git("rev-parse", "HEAD"))
    git("checkout", "-q", "-b", "side", commits[0])
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "side")
    assert run_suite.commits_back_to(commits[0], commits[2]) == 3
    assert run_suite.commits_back_to(commits[2], commits[2]) == 1
    with pytest.raises(ValueError, match=f"--since {commits[2]} is not an ancestor of side"):
        run_suite.commits_back_to(commits[2], "side")


def test_a_variant_queues_every_case_and_seed_under_its_name_and_overrides(monkeypatch):
    queued, tables = [], []
    monkeypatch.setattr(run_suite, "run_queued", lambda experiments, jobs: queued.extend(experiments) or "abc")
    monkeypatch.setattr(run_suite, "dvc", lambda *args, capture=False: " ".join(args))
    monkeypatch.setattr(run_suite, "write_table", lambda script, show, out: tables.append((script, show)))
    argv = ["run_suite.py", "--cases", "a", "b", "--seeds", "0", "3", "--variant", "wide", "--set", "retrieval.k=16"]
    monkeypatch.setattr(sys, "argv", argv)
    run_suite.main()
    assert queued == [
        (f"{case}-s{seed}-wide", case, [f"seed={seed}", "retrieval.k=16"]) for case in ("a", "b") for seed in (0, 3)
    ]
    assert tables[0][1] == "exp show --json --rev abc"  # the table reads the commit the variant was queued at


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--variant", "wide"], "--variant wide needs --set: the settings it changes"),
        (["--set", "retrieval.k=16"], "--set needs --variant: the name its experiments are queued under"),
        (["--variant", "threads2", "--set", "a=1"], "--variant threads2: the two-thread repeat's name"),
        (["--variant", "Wide", "--set", "a=1"], "--variant 'Wide': lower-case letters, digits and single hyphens"),
        (["--variant", "w", "--set", "seed=3"], "--set cannot change seed or benchmark"),
    ],
)
def test_a_variant_is_refused_in_one_line_before_anything_is_queued(monkeypatch, capsys, argv, message):
    monkeypatch.setattr(run_suite, "dvc", lambda *args, capture=False: pytest.fail("nothing may run"))
    monkeypatch.setattr(sys, "argv", ["run_suite.py", *argv])
    with pytest.raises(SystemExit):
        run_suite.main()
    assert message in capsys.readouterr().err
