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


def progress(transient: bool = False) -> Progress:
    """A progress bar with step count, elapsed/remaining time and a free-text field `info` (loss, rate...)."""
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
