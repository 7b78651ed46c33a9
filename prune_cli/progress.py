"""Progress and log output on stderr: a rich bar on a TTY, periodic plain lines elsewhere, nothing with --quiet.

stdout is reserved for results (tables, or the one JSON document with --json).
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@dataclass
class OutputMode:
    quiet: bool = False
    json: bool = False
    plain_interval_s: float = 10.0


MODE = OutputMode()
err_console = Console(stderr=True, highlight=False)


def log(msg: str) -> None:
    """A log line on stderr (never markup: messages carry brackets such as `[base]`)."""
    if not MODE.quiet:
        err_console.print(msg, markup=False, soft_wrap=True)


def warn(msg: str) -> None:
    """A warning on stderr, also under --quiet: it says something about the results."""
    err_console.print(f"warning: {msg}", markup=False, soft_wrap=True)


class _Task:
    def __init__(self, desc: str, total: int | None, bar: Progress | None):
        self.desc, self.total, self.bar = desc, total, bar
        self.done = 0
        self.t0 = time.monotonic()
        self.last_print = self.t0
        self.postfix = ""
        self.tid = bar.add_task(desc, total=total) if bar else None

    def advance(self, n: int = 1, postfix: str | None = None) -> None:
        self.done += n
        if postfix is not None:
            self.postfix = postfix
        if self.bar is not None:
            self.bar.update(self.tid, advance=n, description=f"{self.desc} {self.postfix}".strip())
            return
        now = time.monotonic()
        if not MODE.quiet and (now - self.last_print >= MODE.plain_interval_s):
            self.last_print = now
            self._print_line(now)

    def _print_line(self, now: float) -> None:
        elapsed = now - self.t0
        if self.total:
            eta = elapsed / max(self.done, 1) * (self.total - self.done)
            pct = 100.0 * self.done / self.total
            line = f"[{self.desc}] {self.done}/{self.total} ({pct:.0f}%) elapsed {elapsed:.0f}s eta {eta:.0f}s"
        else:
            line = f"[{self.desc}] {self.done} elapsed {elapsed:.0f}s"
        err_console.print(f"{line} {self.postfix}".rstrip(), markup=False, soft_wrap=True)


@contextmanager
def progress(desc: str, total: int | None = None) -> Iterator[_Task]:
    use_bar = not MODE.quiet and sys.stderr.isatty()
    if use_bar:
        bar = Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=False,
        )
        with bar:
            yield _Task(desc, total, bar)
    else:
        task = _Task(desc, total, None)
        yield task
        if not MODE.quiet:
            task._print_line(time.monotonic())
