"""scripts/run_suite.py's replacement of stopped queue workers, on `dvc queue status` output as DVC prints it."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts.run_suite import workers_missing  # noqa: E402

HEADER = "Task     Name                            Created    Status\n"


def status(rows: list[str], active: int, idle: int) -> str:
    return HEADER + "".join(f"{row}\n" for row in rows) + f"\nWorker status: {active} active, {idle} idle\n"


def test_a_stopped_worker_is_replaced_while_experiments_are_queued():
    queued = [
        "0c6fa98  embedded-mtil-own-shifts-s1     07:17 AM   Running",
        "aaa5ccb  embedded-mtil-s2                07:17 AM   Queued",
    ]
    assert workers_missing(status(queued, 1, 0), jobs=2) == 1
    assert workers_missing(status(queued, 0, 0), jobs=2) == 2
    assert workers_missing(status(queued, 1, 1), jobs=2) == 0  # an idle worker takes the next task itself
    assert workers_missing(status(queued, 2, 0), jobs=2) == 0


def test_no_worker_is_started_when_nothing_is_queued():
    running = ["8d0c40a  embedded-mtil-s0                10:07 AM   Running"]
    assert workers_missing(status(running, 1, 0), jobs=2) == 0
    assert workers_missing(status(["700e8a4  embedded-mtil-s0  07:17 AM   Success"], 0, 0), jobs=2) == 0


def test_a_status_without_the_worker_line_counts_no_worker():
    assert workers_missing(HEADER + "aaa5ccb  embedded-mtil-s2  07:17 AM   Queued\n", jobs=2) == 2
