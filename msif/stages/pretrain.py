"""Stage 1, `msif pretrain`: train the embedding W and pretraining head U on the pretraining task (paper eq. 1)."""

from __future__ import annotations

import time

from omegaconf import DictConfig

from msif.config import resolve_dtype
from msif.console import console, say, table
from msif.data import Tasks
from msif.models import build_pretrain_net, count_parameters, parameter_groups
from msif.runs import load_checkpoint, pretrain_run, save_run
from msif.stages.common import (
    Trained,
    ensure_upstream,
    load_state,
    read_json,
    setup,
    shape_from,
    shape_info,
    state_of,
)
from msif.training import evaluate, train_pretrain_net


def pretrain(cfg: DictConfig, tasks: Tasks | None = None) -> Trained:
    """Train (W, U) on the pretraining task, or reuse the finished run with the same settings."""
    env = setup(cfg, tasks)
    run = pretrain_run(cfg)
    if run.complete and not cfg.force:
        say(f"pretrain: reusing the finished run {run.path} (same settings; force=true retrains)")
        return load_pretrained(cfg, env.tasks)
    task = env.tasks.pretrain
    say(
        f"pretrain: {cfg.dataset.name} classes {task.train.class_names}, m={len(task.train):,} examples, "
        f"model {cfg.model.name}, {cfg.train.pretrain.steps} steps on {env.device}"
    )
    start = time.perf_counter()
    net, fit_stats = train_pretrain_net(cfg, env.tasks, cfg.seed, env.device, env.dtype)
    x, y = task.train.x.to(env.device), task.train.y.to(env.device)
    bs = cfg.train.eval_batch_size
    groups = parameter_groups(net)
    metrics = {
        "stage": "pretrain",
        "m": len(task.train),
        "classes": task.train.class_names,
        "train": evaluate(net, (x, y), bs),
        "test": evaluate(net, (task.test.x.to(env.device), task.test.y.to(env.device)), bs),
        "fit": fit_stats,
        "parameters": {name: count_parameters(p) for name, p in groups.items()},
        "device": str(env.device),
        "seconds": time.perf_counter() - start,
    }
    net = net.cpu()
    save_run(run, cfg, state_of(net), metrics, shape_info(env.tasks, "pretrain"))
    summarize("pretrain", metrics, run.path)
    return Trained(run, net, metrics, run.checkpoint)


def ensure_pretrained(cfg: DictConfig, tasks: Tasks | None = None) -> Trained:
    """The pretrained model these settings ask for: loaded, or made first when missing (if `upstream.auto`)."""
    return ensure_upstream(
        cfg, pretrain_run(cfg), lambda: pretrain(cfg, tasks), lambda path: load_pretrained(cfg, tasks, path)
    )


def load_pretrained(cfg: DictConfig, tasks: Tasks | None = None, path=None) -> Trained:
    run = pretrain_run(cfg)
    path = path or run.checkpoint
    ckpt = load_checkpoint(path, run)
    input_shape, num_classes = shape_from(ckpt, tasks, "pretrain")
    net = build_pretrain_net(cfg.model, input_shape, num_classes, cfg.seed, resolve_dtype(cfg.dtype))
    load_state(net, ckpt["state"], path)
    return Trained(run, net, read_json(path.parent / "metrics.json"), path)


def summarize(stage: str, metrics: dict, path) -> None:
    rows = [
        [split, metrics[split]["n"], metrics[split]["loss"], f"{100 * metrics[split]['accuracy']:.2f}%"]
        for split in ("train", "test")
    ]
    fit = metrics["fit"]
    console.print(
        table(
            f"{stage}: {fit['steps']} steps, {fit['seconds']:.1f} s",
            ["split", "examples", "mean loss", "accuracy"],
            rows,
        )
    )
    params = ", ".join(f"|{k.replace('Theta', 'Θ')}| = {v:,}" for k, v in metrics["parameters"].items())
    say(f"parameters: {params}")
    say(f"saved {path}/checkpoint.pt")
