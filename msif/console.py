"""Terminal output: one rich console, progress bars for long loops, and the summary tables stages end with."""

from __future__ import annotations

import sys
from collections.abc import Iterable

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

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
