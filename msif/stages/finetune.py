"""Stage 2, `msif finetune`: train the finetune head Θ on top of the pretrained embedding W*.

case=fixed (paper eq. 2): W = W* frozen; the features are computed once and only Θ is trained.
case=updated (eq. 3): W starts at W* and is trained with Θ; with `case.proximal=true` the loss also gets the
α‖W − W̄‖² term of the paper's model (eq. 12), W̄ = W*.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from msif.config import finetune_settings
from msif.console import say
from msif.errors import MsifError
from msif.lifecycle import Context, Stage, need, run
from msif.models import build_finetune_net, count_parameters
from msif.runs import RunFolder, Trained
from msif.stages.pretrain import imported, load_trained, pretrained, save_trained, what_is_learned
from msif.training import evaluate, finetune_from, squared_distance


class Finetune(Stage):
    name = "finetune"

    def upstream(self, cfg: DictConfig, ctx: Context) -> Trained:
        return pretrained(cfg, ctx)

    def settings(self, cfg: DictConfig, pre: Trained) -> dict[str, Any]:
        return finetune_settings(cfg, pre.run.signature)

    def location(self, cfg: DictConfig, pre: Trained, signature: str) -> Path:
        return pre.run.path / f"finetune-{cfg.case.name}-{signature}"

    def compute(self, cfg: DictConfig, ctx: Context, pre: Trained, folder: RunFolder) -> Trained:
        tasks = ctx.tasks(cfg)
        task, t, dev = tasks.finetune, cfg.train.finetune, ctx.device
        how = f"weights from {cfg.weights.finetune}" if cfg.weights.finetune else f"{t.steps} steps"
        say(
            f"finetune ({cfg.case.name}): {cfg.dataset.name} {what_is_learned(task.train)}, n={len(task.train):,} "
            f"examples, {how} on {dev}, from {pre.run.path}"
        )
        start = time.perf_counter()
        anchor = [p.detach().to(dev, copy=True) for p in pre.net.embedding.parameters()]
        if cfg.weights.finetune:  # trained elsewhere
            embedding = copy.deepcopy(pre.net.embedding)
            net = build_finetune_net(cfg.model, embedding, tasks.input_shape, task.num_classes, cfg.seed, ctx.dtype)
            net = imported(cfg, ctx, "finetune", net)
            fit_stats = {"imported": str(Path(str(cfg.weights.finetune)).expanduser().resolve())}
            moved = float(squared_distance(net.embedding.parameters(), anchor).sqrt())
            if cfg.case.name == "fixed" and moved > 0:
                raise MsifError(
                    f"case=fixed, but the embedding in {cfg.weights.finetune} differs from the pretrained one "
                    f"(‖W_finetuned − W_pretrained‖ = {moved:.3g}): in case fixed finetuning leaves W as it is.",
                    "Use case=updated for a finetune that trained the embedding too, or check that weights.pretrain "
                    "is the network this finetune started from.",
                )
        else:
            net, fit_stats = finetune_from(cfg, tasks, pre.net.embedding, cfg.seed, dev, ctx.dtype)
        bs = cfg.train.eval_batch_size
        metrics = {
            "stage": "finetune",
            "case": cfg.case.name,
            "n": len(task.train),
            "classes": task.train.class_names,
            "train": evaluate(net, (task.train.x.to(dev), task.train.y.to(dev)), bs),
            "test": evaluate(net, (task.test.x.to(dev), task.test.y.to(dev)), bs),
            "fit": fit_stats,
            "parameters": {
                "W": count_parameters(dict(net.embedding.named_parameters())),
                "Theta": count_parameters(dict(net.head.named_parameters())),
            },
            "device": str(dev),
            "seconds": time.perf_counter() - start,
            "pretrain_run": str(pre.run.path),
        }
        if task.train.texts is not None and not cfg.weights.finetune:
            metrics["random_embedding"] = random_embedding_baseline(cfg, tasks, ctx)
        if cfg.case.name == "updated":
            with torch.no_grad():  # ‖W** − W*‖: how far finetuning moved the embedding
                metrics["embedding_drift"] = float(squared_distance(net.embedding.parameters(), anchor).sqrt())
        net = net.cpu()
        for p in net.parameters():
            p.requires_grad_(True)
        return save_trained(folder, net, metrics, tasks, "finetune", f"finetune ({cfg.case.name})")

    def load(self, cfg: DictConfig, ctx: Context, pre: Trained, folder: RunFolder, path: Path | None = None) -> Trained:
        def build(input_shape, num_classes):
            embedding = copy.deepcopy(pre.net.embedding)
            return build_finetune_net(cfg.model, embedding, input_shape, num_classes, cfg.seed, ctx.dtype)

        return load_trained(cfg, ctx, folder, path, "finetune", build)


def random_embedding_baseline(cfg: DictConfig, tasks, ctx: Context) -> dict:
    """The same finetune recipe on an untrained, randomly initialised embedding, and the majority class's share of
    the test set: did pretraining transfer? (For text, where it often does not.)"""
    from msif.models import build_pretrain_net

    task = tasks.finetune
    untrained = build_pretrain_net(cfg.model, tasks.input_shape, tasks.pretrain.num_classes, cfg.seed + 1, ctx.dtype)
    net, _ = finetune_from(cfg, tasks, untrained.embedding, cfg.seed, ctx.device, ctx.dtype, show_progress=False)
    test = evaluate(net, (task.test.x.to(ctx.device), task.test.y.to(ctx.device)), cfg.train.eval_batch_size)
    counts = torch.bincount(task.test.y, minlength=task.num_classes)
    majority = float(counts.max() / counts.sum())
    return {"test_accuracy": test["accuracy"], "test_loss": test["loss"], "majority": majority}


FINETUNE = Finetune()


def finetune(cfg: DictConfig, ctx: Context | None = None) -> Trained:
    """Finetune from the pretrained checkpoint these settings name (made first if missing and `upstream.auto`)."""
    return run(FINETUNE, cfg, ctx)


def finetuned(cfg: DictConfig, ctx: Context) -> tuple[Trained, Trained]:
    """The (pretrained, finetuned) pair these settings name, made first when missing (if `upstream.auto`)."""
    fin = need(FINETUNE, cfg, ctx)
    return pretrained(cfg, ctx), fin
