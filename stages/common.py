"""What every stage's command line shares: its options (dvc.yaml passes every path explicitly), the params
file it reads, and a user error printed as one line instead of a traceback.

Each stage module has `cli()` (its parser), `run(args, params)` (what it does with them) and `main()`;
`dvc repro` runs `python -m stages.<name> ...` as dvc.yaml says, and the Prefect flow parses the same
command line with the same `cli()` and calls `run` (flows/runner.py)."""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from moder.errors import USER_ERRORS, UserError
from moder.params import Params, ParamsError, load_params


class MissingInput(UserError, RuntimeError):
    """A stage's input file is not there; the message names it and the stage that makes it."""


def parser(description: str, *paths: tuple[str, ...]) -> argparse.ArgumentParser:
    """--params plus one required path option per (name, help[, suffix]); dvc.yaml passes every path
    explicitly. With a suffix, the option only takes a file of that kind, so a slip such as
    `--out params.yaml` is refused before anything is written."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    for name, text, *suffix in paths:
        parser.add_argument(f"--{name}", type=path_with_suffix(*suffix) if suffix else Path, required=True, help=text)
    return parser


def path_with_suffix(suffix: str) -> Callable[[str], Path]:
    def checked(value: str) -> Path:
        if Path(value).suffix != suffix:
            raise argparse.ArgumentTypeError(f"{value!r} is not a {suffix} file")
        return Path(value)

    return checked


def check_task(params: Params, task: str) -> None:
    if task not in params.tasks:
        raise ParamsError(f"unknown task {task!r}; params.yaml tasks: {', '.join(params.tasks)}")


def _die_with_parent() -> None:
    """On Linux, this process gets SIGTERM when the one that started it (`dvc repro`) dies: a stage killed through
    DVC's process stops instead of running on as an orphan that keeps writing. Its partial outputs are temporaries,
    which the next write of the same output removes (moder.io)."""
    if sys.platform != "linux":
        return
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # no prctl: the stage simply runs to its end
        return
    if os.getppid() != parent:  # the parent died before the request was in place
        sys.exit("error: the process that started this stage is gone")


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def run_cli(run: Callable[[argparse.Namespace, Params], object], args: argparse.Namespace) -> None:
    """Load the params named on the command line and `run`; a user error exits with its one line."""
    _die_with_parent()
    try:
        run(args, load_params(args.params))
    except USER_ERRORS as error:
        sys.exit(f"error: {error}")
