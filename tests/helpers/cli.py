"""Running the `msif` command from tests: in this process (`msif`), or in a child process where the process boundary
is what is tested (`msif_subprocess`); and the checks made on what a run printed (`ok`, `refused`).

`msif(args)` calls `msif.cli.main(args)` here, so a test pays neither for importing torch again nor for a fresh
interpreter. It gives back what a subprocess would have: the exit status and the text written to stdout and stderr,
including a traceback printed for an exception that escaped the command (status 1, as for `python -m msif`).
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.env import COLUMNS

CONSOLE_WIDTH = 120  # what msif's consoles use when stdout is not a terminal (a pipe, as for a subprocess)


@dataclass
class Ran:
    """What one `msif ...` command did (the fields of subprocess.CompletedProcess that tests read)."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str


def msif(args: list[str], env: Mapping[str, str] | None = None, threads: int | None = None) -> Ran:
    """Run `msif <args>` in this process and capture its exit status, stdout and stderr.

    `env` sets environment variables for the run only (on top of the test's own, e.g. the `env` fixture's);
    `threads` runs it with that many torch threads (what OMP_NUM_THREADS does for a fresh process).
    Between runs nothing carries over: sys.argv, the environment, the torch threads, the root logger's handlers and
    level (Hydra points them at a log file in the run folder), Hydra's global state and the consoles are put back.
    """
    import torch
    from hydra.core.global_hydra import GlobalHydra

    from msif import cli

    args = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    if GlobalHydra.instance().is_initialized():
        raise RuntimeError("Hydra is still initialized from an earlier compose or run; msif(...) would fail")
    with (
        _environment({"COLUMNS": COLUMNS, **(env or {})}),
        _threads(threads, torch),
        _logging_restored(),
        _argv_restored(),
    ):
        with redirect_stdout(out), redirect_stderr(err), _consoles():
            try:
                code = cli.main(args)
            except SystemExit as exit_:
                code = exit_.code
            except Exception:
                traceback.print_exc()
                code = 1
    if GlobalHydra.instance().is_initialized():  # Hydra clears it in a `finally`; a leak would break the next run
        GlobalHydra.instance().clear()
        raise RuntimeError(f"msif {' '.join(args)} left Hydra initialized")
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message") prints the message and exits with status 1
        err.write(f"{code}\n")
        code = 1
    return Ran(args, code, out.getvalue(), err.getvalue())


def msif_subprocess(
    args: list[str], env: Mapping[str, str] | None = None, cwd: Path | None = None, command: list[str] | None = None
) -> subprocess.CompletedProcess:
    """Run `python -m msif <args>` (or `command <args>`) in a child process with this process's environment plus
    `env`: for what only a fresh process shows (the console script starts, signals, torchrun). The child runs with
    as many torch threads as this process (OMP_NUM_THREADS), unless `env` says otherwise."""
    import torch

    return subprocess.run(
        [*(command or [sys.executable, "-m", "msif"]), *args],
        env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stdout + proc.stderr
    return proc


def refused(proc, *needles):
    """A clean refusal: nonzero exit, no traceback, and the message says what was wrong."""
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text
    assert "Traceback" not in text, text
    flat = " ".join(text.split())
    for n in needles:
        assert n in flat, f"{n!r} not in:\n{text}"
    return proc


def folders(root: Path, pattern: str) -> list[Path]:
    """The finished run folders (those with a checkpoint) under `root` whose names match `pattern`."""
    return sorted(p.parent for p in root.rglob(f"{pattern}/checkpoint.pt"))


@contextmanager
def _environment(env: Mapping[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update({k: str(v) for k, v in env.items()})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def _threads(threads: int | None, torch) -> Iterator[None]:
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@contextmanager
def _argv_restored() -> Iterator[None]:
    saved = list(sys.argv)
    try:
        yield
    finally:
        sys.argv = saved


@contextmanager
def _logging_restored() -> Iterator[None]:
    """Hydra configures logging for each run (a file handler in the run's log folder, level INFO on the root logger):
    close what it added and give the root logger back its own handlers and level."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
                h.close()
        for h in handlers:
            if h not in root.handlers:
                root.addHandler(h)
        root.setLevel(level)


@contextmanager
def _consoles() -> Iterator[None]:
    """msif's rich consoles are made at import, with the width and colours of the stdout / stderr of then (under
    `pytest -s` in a terminal: its width, ANSI colours). For a run they must write what a subprocess writes into a
    pipe: to the (redirected) sys.stdout / sys.stderr of now, 120 columns, no colour codes, not quiet (a torchrun
    worker's setup makes one quiet)."""
    from msif.console import console, err_console

    saved = [(c, c.width, c.quiet, c._color_system) for c in (console, err_console)]
    for c in (console, err_console):
        c.width, c.quiet, c._color_system = CONSOLE_WIDTH, False, None
    if console.file is not sys.stdout or err_console.file is not sys.stderr:
        raise RuntimeError("msif's consoles do not write to the current sys.stdout / sys.stderr; rebind them here")
    try:
        yield
    finally:
        for c, width, quiet, colors in saved:
            c.width, c.quiet, c._color_system = width, quiet, colors
