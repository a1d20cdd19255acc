"""The stage lifecycle: what every `msif` stage does around its own computation, written once.

A stage (msif/stages/*.py) implements `Stage`: `check` (all validation, before any upstream work), `upstream` (the
results it builds on), `settings` (what enters its run folder's signature), `location`, `compute` and `load`.
`run(stage, cfg)` then does the rest the same way for every stage:

    check -> upstream (process 0 first under torchrun) -> run folder from the settings' signature
          -> finished and not force: load (and say so) | else: config.yaml, compute (which writes the marker last)

`need(stage, cfg, ctx)` is the same for a stage another one builds on: its result is loaded when it exists (from
`upstream.<stage>` or the folder its settings name), made first when missing and `upstream.auto`, else refused.

A `Context` holds what one command loads once: the device, the dtype, the data sets (by their settings) and every
stage result already loaded or made, so a stage asked for twice in one command is read from disk once.
`run_jobs` spreads independent retrains over worker processes and `ResumableRows` keeps their results in a CSV table
that a rerun continues (validate-loo, cleanse).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack
from multiprocessing import get_context
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from msif import distributed
from msif.allocator import keep_freed_memory
from msif.config import resolve_device, resolve_dtype, signature, validate_config
from msif.console import console, say
from msif.data import Tasks, build_tasks
from msif.errors import MsifError, disk_error
from msif.io import KEEP, append_csv_row, atomic_write_text, read_resumable_csv
from msif.locks import claimed
from msif.runs import CHECKPOINT, RunFolder, resolve_upstream


class Context:
    """One command's device, dtype, data sets and stage results, each made or loaded once."""

    def __init__(self, cfg: DictConfig):
        validate_config(cfg)
        self.dtype = resolve_dtype(cfg.dtype)
        self.device = distributed.local_device(resolve_device(cfg.device))
        distributed.init(self.device)  # under torchrun: join the process group (no-op otherwise)
        if not distributed.is_main():
            console.quiet = True  # one process prints
        self._tasks: dict[str, Tasks] = {}
        self.results: dict[tuple[str, str], Any] = {}  # (stage, run folder) -> its result

    def tasks(self, cfg: DictConfig) -> Tasks:
        """The pretraining and finetuning tasks `cfg.dataset` describes (loaded on first use)."""
        key = signature({"dataset": cfg.dataset, "cache_dir": cfg.cache_dir, "dtype": cfg.dtype})
        if key not in self._tasks:
            self._tasks[key] = build_tasks(cfg.dataset, cfg.cache_dir, self.dtype)
        return self._tasks[key]


class Stage(ABC):
    """One step of the pipeline; `run` and `need` drive it. Results are whatever the stage returns."""

    name: ClassVar[str]  # as on the command line and in `upstream.<name>`
    marker: ClassVar[str | None] = CHECKPOINT  # the file written last (a finished run); None: always compute

    def check(self, cfg: DictConfig, ctx: Context) -> None:  # noqa: B027  (no checks is a valid default)
        """Refuse bad settings before any upstream work (may read the data sets, never train)."""

    def upstream(self, cfg: DictConfig, ctx: Context) -> Any:
        """The results this stage builds on (through `need`), None for the first stage."""
        return None

    @abstractmethod
    def settings(self, cfg: DictConfig, up: Any) -> dict[str, Any]:
        """Exactly the settings that determine the result: they name the run folder."""

    @abstractmethod
    def location(self, cfg: DictConfig, up: Any, signature: str) -> Path:
        """The run folder for a signature."""

    @abstractmethod
    def compute(self, cfg: DictConfig, ctx: Context, up: Any, folder: RunFolder) -> Any:
        """Make the result in `folder`, writing `marker` last."""

    def load(self, cfg: DictConfig, ctx: Context, up: Any, folder: RunFolder, path: Path | None = None) -> Any:
        """The finished result in `folder` (or the checkpoint at `path`, given as `upstream.<name>`)."""
        raise NotImplementedError(f"{type(self).__name__} has no finished results to load")

    def reused(self, cfg: DictConfig, ctx: Context, result: Any) -> None:  # noqa: B027
        """What to show or add when a finished run is reused by `run`."""

    def folder(self, cfg: DictConfig, up: Any) -> RunFolder:
        settings = self.settings(cfg, up)
        return RunFolder(self.name, self.location(cfg, up, signature(settings)), settings, marker=self.marker)


def run(stage: Stage, cfg: DictConfig, ctx: Context | None = None) -> Any:
    """Run `stage` as the command asked: reuse its finished run unless `force`, else compute it."""
    if ctx is None:
        ctx = Context(cfg)  # validates cfg
    else:
        validate_config(cfg)
    stage.check(cfg, ctx)
    with distributed.main_first():  # under torchrun, process 0 makes a missing upstream stage; the others load it
        up = stage.upstream(cfg, ctx)
    folder = stage.folder(cfg, up)
    key = (stage.name, str(folder.path))
    finished = stage.marker is not None and folder.complete and not cfg.force
    if distributed.broadcast_from_main(finished):  # every process takes the same branch
        if key not in ctx.results:
            ctx.results[key] = stage.load(cfg, ctx, up, folder)
        if distributed.is_main():
            say(f"{stage.name}: reusing the finished run {folder.path} (same settings; force=true recomputes)")
            stage.reused(cfg, ctx, ctx.results[key])
        return ctx.results[key]
    return _compute(stage, cfg, ctx, up, folder)


def need(stage: Stage, cfg: DictConfig, ctx: Context) -> Any:
    """The result of `stage` that a later stage builds on: loaded, or made first when missing (if `upstream.auto`)."""
    up = stage.upstream(cfg, ctx)
    folder = stage.folder(cfg, up)
    key = (stage.name, str(folder.path))
    if key in ctx.results:
        return ctx.results[key]
    given = cfg.upstream.get(stage.name)
    path = resolve_upstream(cfg, folder)
    if path.exists():
        ctx.results[key] = stage.load(cfg, ctx, up, folder, path)
        return ctx.results[key]
    if given:
        raise MsifError(
            f"upstream.{stage.name} points at {path}, which does not exist.",
            f"Point it at a {stage.name} run folder, or drop it to use the one these settings name.",
        )
    if not cfg.upstream.auto:
        raise MsifError(
            f"There is no {stage.name} checkpoint for these settings (looked for {path}).",
            f"Run `msif {stage.name}` with the same overrides first, or drop upstream.auto=false.",
        )
    say(
        f"No {stage.name} checkpoint for these settings at {folder.path}; running `msif {stage.name}` first "
        "(upstream.auto=false stops instead)."
    )
    return _compute(stage, cfg, ctx, up, folder)


def _compute(stage: Stage, cfg: DictConfig, ctx: Context, up: Any, folder: RunFolder) -> Any:
    """config.yaml first (process 0), then the stage's computation, remembered for the rest of the command."""
    key = (stage.name, str(folder.path))
    with ExitStack() as held:
        try:  # before any work: a folder msif cannot write would otherwise fail only at its first save
            folder.path.mkdir(parents=True, exist_ok=True)
            if distributed.is_main():  # one command at a time per folder (process 0 holds it for torchrun's)
                held.enter_context(claimed(folder.path, stage.name))
        except OSError as err:
            raise disk_error(err, f"create the {stage.name} run folder") from None
        if stage.marker is not None and folder.complete and not cfg.force and not distributed.active():
            # another command finished it while this one was starting: reuse, as `run` would have
            ctx.results[key] = stage.load(cfg, ctx, up, folder)
        else:
            if distributed.is_main():
                atomic_write_text(OmegaConf.to_yaml(cfg, resolve=True), folder.path / "config.yaml")
            ctx.results[key] = stage.compute(cfg, ctx, up, folder)
    return ctx.results[key]


# --- independent retrains in worker processes -------------------------------------------------------------------


def threads_per_worker(threads: int | None, workers: int) -> int:
    """Torch threads for each of `workers` parallel retrains: `threads` when given, else the cores shared out."""
    if threads:
        return int(threads)
    return max(1, (os.cpu_count() or 1) // max(1, int(workers)))


def run_jobs(
    jobs: Iterable[tuple],
    workers: int,
    threads: int,
    cfg: DictConfig,
    state: Callable[[DictConfig, Context], Any],
    work: Callable[..., Any],
    here: Any = None,
) -> Iterator[Any]:
    """Yield `work(state, *job)` for each job as it finishes.

    With `workers` <= 1 the jobs run in this process with `threads` torch threads and the state `here` (made by
    `state(cfg, Context(cfg))` when None). Otherwise `workers` spawned processes each make their own state once,
    with `threads` torch threads, from `cfg` (resolved); `state` and `work` must then be module-level functions."""
    if workers <= 1:
        here = state(cfg, Context(cfg)) if here is None else here
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for job in jobs:
                yield work(here, *job)
        finally:
            torch.set_num_threads(previous)
        return
    initargs = (OmegaConf.to_yaml(cfg, resolve=True), threads, state, os.getpid())
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_start_worker, initargs=initargs)
    futures = [pool.submit(_in_worker, work, *job) for job in jobs]
    given: set = set()
    try:
        for f in as_completed(futures):
            given.add(f)
            try:
                result = f.result()
            except BrokenProcessPool:
                raise MsifError(
                    "A worker process ended abruptly (killed from outside, or out of memory) while computing "
                    "retrains. Every retrain that finished before is saved.",
                    "Rerun the same command to continue; if memory ran out, use fewer workers (loo.workers or "
                    "lds.workers).",
                ) from None
            yield result
    except KeyboardInterrupt:
        # Ctrl-C: no new jobs; what the workers finished already is handed over before the interrupt goes on
        for f in futures:
            f.cancel()
        for f in futures:
            if f.done() and not f.cancelled() and f not in given and f.exception() is None:
                given.add(f)
                yield f.result()
        raise
    finally:
        for f in futures:
            f.cancel()
        _stop(pool)


def _stop(pool: ProcessPoolExecutor) -> None:
    """End the pool now: running jobs are abandoned (their work is redone by a rerun), not waited for."""
    processes = list(getattr(pool, "_processes", {}).values())  # the executor has no public way to stop a job
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(timeout=10)


_worker_state: Any = None  # a spawned worker's state, made once by _start_worker (the pool's only global)


def _die_with(parent: int) -> None:
    """Make the kernel kill this worker when its parent dies (Linux PR_SET_PDEATHSIG), e.g. on SIGKILL of the
    command, instead of leaving it computing for no one; elsewhere the pool's own shutdown has to do."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the pool
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the line above ran
        os._exit(1)


def _start_worker(config: str, threads: int, state: Callable[[DictConfig, Context], Any], parent: int) -> None:
    global _worker_state
    _die_with(parent)
    keep_freed_memory()  # as the CLI process does (msif/allocator.py)
    torch.set_num_threads(threads)
    cfg = OmegaConf.create(config)
    _worker_state = state(cfg, Context(cfg))


def _in_worker(work: Callable[..., Any], *job: Any) -> Any:
    return work(_worker_state, *job)


# --- resumable result tables --------------------------------------------------------------------------------------


class ResumableRows:
    """A CSV table with one row per finished job, appended (and flushed) as each finishes, so a rerun continues.

    An existing table is checked before it is continued: whole lines, the expected `columns`, numbers in `numeric`,
    each `key` once, and `valid(frame)` (a message when the rows do not belong to this run). A table that fails is
    refused and kept as it is. A header-only table (interrupted before the first job) continues as empty."""

    def __init__(
        self,
        csv: Path,
        columns: list[str],
        key: list[str],
        numeric: list[str],
        valid: Callable[[pd.DataFrame], str | None] | None = None,
    ):
        self.csv, self.columns, self.key = Path(csv), list(columns), list(key)
        done = pd.DataFrame(columns=self.columns)
        if self.csv.exists():
            done = read_resumable_csv(self.csv, self.columns)
            if len(done):
                values = done[numeric]
                if values.isna().any().any() or not all(pd.api.types.is_numeric_dtype(t) for t in values.dtypes):
                    raise MsifError(f"{self.csv} has empty or non-numeric values in its rows.", KEEP)
                if done.duplicated(self.key).any():
                    raise MsifError(f"{self.csv} repeats a row for the same {', '.join(self.key)}.", KEEP)
                problem = valid(done) if valid is not None else None
                if problem:
                    raise MsifError(f"{self.csv} {problem}.", KEEP)
        else:
            atomic_write_text(",".join(self.columns) + "\n", self.csv)
        self.done = len(done)
        self.rows: list[dict] = done.to_dict("records")
        self._keys = {tuple(r[k] for k in self.key) for r in self.rows}

    def __contains__(self, key: tuple) -> bool:
        return tuple(key) in self._keys

    def append(self, row: dict) -> None:
        self.rows.append(row)
        self._keys.add(tuple(row[k] for k in self.key))
        append_csv_row(self.csv, self.columns, row)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=self.columns)
