"""Stage 2, `msif finetune`: train the finetune head Θ on top of the pretrained embedding W*.

case=fixed (paper eq. 2): W = W* frozen; the features are computed once and only Θ is trained.
case=updated (eq. 3): W starts at W* and is trained with Θ; with `case.proximal=true` the loss also gets the
α‖W − W̄‖² term of the paper's model (eq. 12), W̄ = W*.
"""

from __future__ import annotations

import copy
import time

import torch
from omegaconf import DictConfig

from msif.config import resolve_dtype
from msif.console import say
from msif.data import Tasks
from msif.models import build_finetune_net, count_parameters
from msif.runs import finetune_run, load_checkpoint, save_run
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
from msif.stages.pretrain import ensure_pretrained, summarize
from msif.training import evaluate, finetune_from, squared_distance


def finetune(cfg: DictConfig, tasks: Tasks | None = None) -> Trained:
    """Finetune from the pretrained checkpoint these settings name (made first if missing and `upstream.auto`)."""
    env = setup(cfg, tasks)
    pre = ensure_pretrained(cfg, env.tasks)
    run = finetune_run(cfg, pre.run)
    if run.complete and not cfg.force:
        say(f"finetune: reusing the finished run {run.path} (same settings; force=true retrains)")
        return load_finetuned(cfg, pre, env.tasks)
    task = env.tasks.finetune
    t = cfg.train.finetune
    say(
        f"finetune ({cfg.case.name}): {cfg.dataset.name} classes {task.train.class_names}, n={len(task.train):,} "
        f"examples, {t.steps} steps on {env.device}, from {pre.run.path}"
    )
    start = time.perf_counter()
    anchor = [p.detach().to(env.device, copy=True) for p in pre.net.embedding.parameters()]
    net, fit_stats = finetune_from(cfg, env.tasks, pre.net.embedding, cfg.seed, env.device, env.dtype)
    x, y = task.train.x.to(env.device), task.train.y.to(env.device)
    bs = cfg.train.eval_batch_size
    metrics = {
        "stage": "finetune",
        "case": cfg.case.name,
        "n": len(task.train),
        "classes": task.train.class_names,
        "train": evaluate(net, (x, y), bs),
        "test": evaluate(net, (task.test.x.to(env.device), task.test.y.to(env.device)), bs),
        "fit": fit_stats,
        "parameters": {
            "W": count_parameters(dict(net.embedding.named_parameters())),
            "Theta": count_parameters(dict(net.head.named_parameters())),
        },
        "device": str(env.device),
        "seconds": time.perf_counter() - start,
        "pretrain_run": str(pre.run.path),
    }
    if cfg.case.update_embedding:
        with torch.no_grad():  # ‖W** − W*‖: how far finetuning moved the embedding
            metrics["embedding_drift"] = float(squared_distance(net.embedding.parameters(), anchor).sqrt())
    net = net.cpu()
    for p in net.parameters():
        p.requires_grad_(True)
    save_run(run, cfg, state_of(net), metrics, shape_info(env.tasks, "finetune"))
    summarize(f"finetune ({cfg.case.name})", metrics, run.path)
    return Trained(run, net, metrics, run.checkpoint)


def ensure_finetuned(cfg: DictConfig, tasks: Tasks | None = None) -> tuple[Trained, Trained]:
    """The (pretrained, finetuned) pair these settings name, made first when missing (if `upstream.auto`)."""
    env = setup(cfg, tasks)
    pre = ensure_pretrained(cfg, env.tasks)
    fin = ensure_upstream(
        cfg,
        finetune_run(cfg, pre.run),
        lambda: finetune(cfg, env.tasks),
        lambda path: load_finetuned(cfg, pre, env.tasks, path),
    )
    return pre, fin


def load_finetuned(cfg: DictConfig, pre: Trained, tasks: Tasks | None = None, path=None) -> Trained:
    run = finetune_run(cfg, pre.run)
    path = path or run.checkpoint
    ckpt = load_checkpoint(path, run)
    input_shape, num_classes = shape_from(ckpt, tasks, "finetune")
    net = build_finetune_net(
        cfg.model, copy.deepcopy(pre.net.embedding), input_shape, num_classes, cfg.seed, resolve_dtype(cfg.dtype)
    )
    load_state(net, ckpt["state"], path)
    return Trained(run, net, read_json(path.parent / "metrics.json"), path)
