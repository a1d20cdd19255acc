"""Progress reporting for long loops, without a dependency on any terminal library.

The numerical code (msif.influence, msif.training) asks `progress()` for a bar and reports steps to it. By default
that bar does nothing, so a library user sees no output (and `logging` carries the messages). The `msif` command
installs a rich progress bar with `set_progress_factory` (msif/console.py); any object with the same four methods
(a context manager with `add_task`, `update`, `advance`) works, e.g. a tqdm adapter in a notebook.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol


class ProgressBar(Protocol):
    def __enter__(self) -> ProgressBar: ...

    def __exit__(self, *exc: object) -> None: ...

    def add_task(self, description: str, total: float | None = None, **fields: Any) -> Any: ...

    def update(self, task: Any, **kwargs: Any) -> None: ...

    def advance(self, task: Any, advance: float = 1) -> None: ...


class NoProgress:
    """The default bar: accepts every call and shows nothing."""

    def __enter__(self) -> NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, **fields: Any) -> int:
        return 0

    def update(self, task: Any, **kwargs: Any) -> None:
        return None

    def advance(self, task: Any, advance: float = 1) -> None:
        return None


_factory: Callable[[bool], ProgressBar] | None = None


def set_progress_factory(factory: Callable[[bool], ProgressBar] | None) -> None:
    """Make `progress(transient)` return `factory(transient)` (None: back to no bars)."""
    global _factory
    _factory = factory


def progress(transient: bool = False) -> ProgressBar:
    """A progress bar for one loop; `transient` bars vanish when done (solver iterations, scoring)."""
    return _factory(transient) if _factory is not None else NoProgress()
