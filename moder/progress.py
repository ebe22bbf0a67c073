"""Progress of the long loops (pre-training, expert training) as a terminal bar or as lines of a log."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Protocol

from tqdm.auto import tqdm


class Stream(Protocol):
    """Where a bar's state can be written as text (a file, LogLines)."""

    def write(self, text: str) -> int: ...

    def flush(self) -> None: ...


Progress = bool | Stream  # True: a bar on stderr; a text stream: the bar's state written there, at most every 30 s
# Where the stages' bars go: the terminal, unless the code running a stage says otherwise in its own context (a
# Prefect task sends them to its log as lines: concurrent tasks' bars would garble one terminal)
PROGRESS: ContextVar[Progress] = ContextVar("moder_progress", default=True)


def progress_bar(progress: Progress, iterable: Iterable | None = None, **options: Any) -> tqdm:
    if isinstance(progress, bool):
        return tqdm(iterable, disable=not progress, **options)
    # a log reads each refresh as a line: few of them, no terminal codes, and the final state kept
    return tqdm(iterable, file=progress, mininterval=30, ascii=True, **{**options, "leave": True})


class LogLines:
    """A text stream that logs each non-blank line written to it (a bar's carriage-return refreshes
    included) at INFO, so that concurrent tasks' progress goes to their own logs, not one terminal."""

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter):
        self.logger = logger

    def write(self, text: str) -> int:
        for line in re.split(r"[\r\n]+", text):
            if line.strip():
                self.logger.info(line.strip())
        return len(text)

    def flush(self) -> None:
        pass


@contextmanager
def progress_to(target: Progress) -> Iterator[None]:
    """Inside the block, the stages run in this context write their bars to `target`."""
    token = PROGRESS.set(target)
    try:
        yield
    finally:
        PROGRESS.reset(token)
