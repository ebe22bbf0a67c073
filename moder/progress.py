"""Progress of the long loops (pre-training, expert training) as a terminal bar or as lines of a log."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm.auto import tqdm

Progress = bool | TextIO  # True: a bar on stderr; a text stream: the bar's state written there, at most every 30 s


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
