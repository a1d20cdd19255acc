"""Terminal output of the `msif` command: one rich console, progress bars for long loops, the summary tables stages
end with, and `terminal()`, which routes the library's logging, warnings and progress (msif.progress) to it."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from msif import progress as library_progress
from msif.errors import UnconvergedSolveWarning

# Terminals set their own width; logs and pipes get 120 columns rather than rich's default 80.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 120)


LINE_INTERVAL_S = 30.0  # a log or pipe gets one progress line per task at most this often (and one at the end)


class LineProgress:
    """What a log file or pipe gets instead of a live bar: a line `description: done/total, rate, elapsed, eta, info`
    per task at most every LINE_INTERVAL_S seconds and when the task completes, so an 80-minute validate-loo run
    shows that it is alive and how far it is."""

    def __init__(self, out: Console, interval: float = LINE_INTERVAL_S, clock=None):
        import time

        self.out, self.interval, self.clock = out, interval, clock or time.monotonic
        self.tasks: dict[int, dict] = {}

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, **fields: object) -> int:
        now = self.clock()
        self.tasks[len(self.tasks)] = {
            "description": description, "total": total, "completed": float(fields.get("completed", 0.0)),
            "info": fields.get("info", ""), "initial": float(fields.get("completed", 0.0)),  # resumed work is not rate
            "start": now, "printed": now, "done": False,
        }  # fmt: skip
        return len(self.tasks) - 1

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, completed=self.tasks[task]["completed"] + advance)

    def update(self, task: int, **kwargs: object) -> None:
        t = self.tasks[task]
        for key in ("completed", "total", "info", "description"):
            if key in kwargs:
                t[key] = kwargs[key]
        if "advance" in kwargs:
            t["completed"] += float(kwargs["advance"])
        now = self.clock()
        finished = t["total"] is not None and t["completed"] >= t["total"]
        if (finished and not t["done"]) or now - t["printed"] >= self.interval:
            t["printed"], t["done"] = now, finished
            self.out.print(self.line(t, now), soft_wrap=True, markup=False, highlight=False)

    @staticmethod
    def line(t: dict, now: float) -> str:
        done, total, elapsed = float(t["completed"]), t["total"], now - t["start"]
        count = f"{done:,.0f}/{total:,.0f}" if total is not None else f"{done:,.0f}"
        parts = [f"{t['description']}: {count}", f"{elapsed:,.0f} s elapsed"]
        new = done - t["initial"]
        if new > 0 and elapsed > 0:
            parts.append(f"{elapsed / new:.3g} s each")
            if total is not None and total > done:
                parts.append(f"eta {(total - done) * elapsed / new:,.0f} s")
        if t["info"]:
            parts.append(str(t["info"]))
        return ", ".join(parts)


def progress(transient: bool = False) -> Progress | LineProgress:
    """A progress bar with step count, elapsed/remaining time and a free-text field `info` (loss, rate...); in a log
    or pipe, progress lines at a bounded rate instead (transient bars, inner loops, print nothing there)."""
    if not console.is_terminal and not transient:
        return LineProgress(console)
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
        disable=transient and not console.is_terminal,  # a log or pipe gets no empty lines from vanished bars
    )


def table(title: str, columns: Iterable[str], rows: Iterable[Iterable[object]]) -> Table:
    t = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*[fmt(v) for v in r])
    return t


def fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def say(msg: str) -> None:
    console.print(msg, soft_wrap=True)


def print_error(message: str) -> None:
    """One paragraph on stderr, unwrapped so it can be copied whole."""
    err_console.print(f"[bold red]msif: error:[/] {escape(message)}", soft_wrap=True)


class ConsoleHandler(logging.Handler):
    """Log records as console lines: warnings and errors marked, information plain."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = escape(record.getMessage())
        except Exception:  # noqa: BLE001  (a malformed record must not end the run)
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING:
            console.print(f"[yellow]warning:[/] {text}", soft_wrap=True)
        else:
            console.print(text, soft_wrap=True)


@contextmanager
def terminal() -> Iterator[None]:
    """While a stage runs: the "msif" logger prints to the console at INFO, warnings raised by msif print as
    `warning: ...` lines, and the library's progress bars are rich bars. Everything is restored afterwards."""
    logger = logging.getLogger("msif")
    handler = ConsoleHandler()
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    library_progress.set_progress_factory(progress)

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        console.print(f"[yellow]warning:[/] {escape(str(message))}", soft_wrap=True)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", UnconvergedSolveWarning)  # every unconverged solve, not the first only
            warnings.showwarning = show
            yield
    finally:
        library_progress.set_progress_factory(None)
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate
