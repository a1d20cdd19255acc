"""What every stage does first (validate, pick device and dtype, load the tasks) and how trained nets come back."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from msif import distributed
from msif.config import resolve_device, resolve_dtype, validate_config
from msif.console import console, say
from msif.data import Tasks, build_tasks
from msif.errors import MsifError
from msif.models import TwoStageNet
from msif.runs import RunFolder, resolve_upstream


@dataclass
class Trained:
    """A finished stage: its run folder, the trained network (on CPU) and its metrics."""

    run: RunFolder
    net: TwoStageNet
    metrics: dict[str, Any]
    checkpoint: Path


@dataclass
class Setup:
    device: torch.device
    dtype: torch.dtype
    tasks: Tasks


def setup(cfg: DictConfig, tasks: Tasks | None = None) -> Setup:
    validate_config(cfg)
    dtype = resolve_dtype(cfg.dtype)
    device = distributed.local_device(resolve_device(cfg.device))
    distributed.init(device)  # under torchrun: join the process group (no-op otherwise)
    if not distributed.is_main():
        console.quiet = True  # one process prints
    if tasks is None:
        tasks = build_tasks(cfg.dataset, cfg.cache_dir, dtype)
    return Setup(device, dtype, tasks)


def load_state(net: TwoStageNet, state: dict[str, Any], path: Path) -> None:
    """Load `state` = {"embedding": ..., "head": ...} into `net`, refusing a checkpoint of another architecture."""
    try:
        net.embedding.load_state_dict(state["embedding"])
        net.head.load_state_dict(state["head"])
    except (KeyError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0][:300]
        raise MsifError(
            f"The checkpoint {path} does not fit the network this config builds ({first}).",
            "It was made with a different model; use the model config it was made with.",
        ) from None


def state_of(net: TwoStageNet) -> dict[str, Any]:
    return {
        "embedding": {k: v.detach().cpu().clone() for k, v in net.embedding.state_dict().items()},
        "head": {k: v.detach().cpu().clone() for k, v in net.head.state_dict().items()},
    }


def shape_info(tasks: Tasks, stage: str) -> dict[str, Any]:
    """What a checkpoint records so its network can be rebuilt without loading the data."""
    task = getattr(tasks, stage)
    return {
        "input_shape": list(tasks.input_shape),
        "num_classes": task.num_classes,
        "class_names": list(task.train.class_names),
    }


def shape_from(ckpt: dict[str, Any], tasks: Tasks | None, stage: str) -> tuple[tuple[int, ...], int]:
    if "input_shape" in ckpt:
        return tuple(int(s) for s in ckpt["input_shape"]), int(ckpt["num_classes"])
    task = getattr(tasks, stage)
    return tasks.input_shape, task.num_classes


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def ensure_upstream(
    cfg: DictConfig, run: RunFolder, make: Callable[[], Trained], load: Callable[[Path], Trained]
) -> Trained:
    """The `run.stage` result these settings name: loaded when it exists, else made (if `upstream.auto`)."""
    path = resolve_upstream(cfg, run)
    if path.exists():
        return load(path)
    if cfg.upstream.get(run.stage):
        raise MsifError(
            f"upstream.{run.stage} points at {path}, which does not exist.",
            f"Point it at a {run.stage} run folder, or drop it to use the one these settings name.",
        )
    if not cfg.upstream.auto:
        raise MsifError(
            f"There is no {run.stage} checkpoint for these settings (looked for {path}).",
            f"Run `msif {run.stage}` with the same overrides first, or drop upstream.auto=false.",
        )
    say(
        f"No {run.stage} checkpoint for these settings at {run.path}; running `msif {run.stage}` first "
        "(upstream.auto=false stops instead)."
    )
    return make()


def threads_per_worker(threads: int | None, workers: int) -> int:
    """Torch threads for each of `workers` parallel retrains: `threads` when given, else the cores shared out."""
    if threads:
        return int(threads)
    return max(1, (os.cpu_count() or 1) // max(1, int(workers)))


def run_jobs(
    jobs: Iterable[tuple],
    workers: int,
    threads: int,
    here: Callable[..., Any],
    cfg: DictConfig,
    init: Callable[[DictConfig, Setup], None],
    there: Callable[..., Any],
) -> Iterator[Any]:
    """Yield the result of each job (a tuple of arguments) as it finishes: `here(*job)` in this process with `threads`
    torch threads when `workers` <= 1, else `there(*job)` in `workers` spawned processes. Each of those is set up
    once by `_start_worker`: `threads` torch threads, `cfg` (resolved), `setup(cfg)`, then `init(cfg, env)` for the
    stage's own state. `init` and `there` must be module-level functions."""
    if workers <= 1:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for job in jobs:
                yield here(*job)
        finally:
            torch.set_num_threads(previous)
        return
    initargs = (OmegaConf.to_yaml(cfg, resolve=True), threads, init)
    with ProcessPoolExecutor(
        workers, mp_context=get_context("spawn"), initializer=_start_worker, initargs=initargs
    ) as pool:
        for f in as_completed([pool.submit(there, *job) for job in jobs]):
            yield f.result()


def _start_worker(config: str, threads: int, init: Callable[[DictConfig, Setup], None]) -> None:
    torch.set_num_threads(threads)
    cfg = OmegaConf.create(config)
    init(cfg, setup(cfg))
