"""Progress bars for the long client phases (token training, generation, encoder training).

Bars go to stderr through tqdm. On a terminal they redraw in place; anywhere else (a Ray
worker in a simulation, a SuperNode's log file, CI) every refresh becomes one plain line and
refreshes are at least :data:`LOG_INTERVAL` seconds apart, so a log holds a phase's final
line plus one line per interval of a long phase, never carriage-return noise.
``output.progress = false`` turns them off.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO, TypeVar

from tqdm.auto import tqdm  # type: ignore[import-untyped]  # no stubs installed

T = TypeVar("T")

TTY_INTERVAL = 0.5  # seconds between redraws on a terminal
LOG_INTERVAL = 15.0  # seconds between lines in a log
LOG_WIDTH = 100  # characters of a bar line in a log


class _LogLines:
    """A stream for logs: one line per bar refresh that shows new progress.

    tqdm draws 0/N before any work and redraws the last count when it closes; a log gains
    nothing from either, so a line is written only when the bar's count has moved.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.bar: Any = None  # the tqdm bar writing here (set once it exists)
        self.written = 0  # the bar's count at the last line

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if not line or self.bar is None or self.bar.n == self.written:
            return
        self.written = self.bar.n
        self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


@dataclass(frozen=True)
class Progress:
    """Whether to show bars, and the label that says whose bar it is (e.g. client and round)."""

    enabled: bool = False
    label: str = ""

    def over(self, items: Iterable[T], total: int, phase: str) -> Iterator[T]:
        """Yield ``items`` (``total`` of them) under a bar named ``<label> <phase>``."""
        if not self.enabled:
            yield from items
            return
        stream = sys.stderr  # looked up per bar: tests and loggers may swap it
        tty = stream.isatty()
        log = None if tty else _LogLines(stream)
        bar = tqdm(
            items,
            total=total,
            desc=f"{self.label} {phase}".strip(),
            file=stream if log is None else log,
            mininterval=TTY_INTERVAL if tty else LOG_INTERVAL,
            ncols=None if tty else LOG_WIDTH,
            dynamic_ncols=tty,
            leave=True,
            unit="batch",
        )
        if log is not None:
            log.bar = bar
        try:
            yield from bar
        finally:
            bar.close()


QUIET = Progress()
