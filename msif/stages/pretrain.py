"""Stage 1, `msif pretrain`: train the embedding W and pretraining head U on the pretraining task (paper eq. 1)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from msif.config import pretrain_settings, to_plain
from msif.console import console, say
from msif.io import atomic_write_text
from msif.lifecycle import Context, Stage, need, run
from msif.models import build_pretrain_net, count_parameters, parameter_groups
from msif.runs import (
    RunFolder,
    Trained,
    load_checkpoint,
    load_state,
    load_weights,
    read_json,
    read_weights,
    save_run,
    state_of,
)
from msif.summaries import trained_table
from msif.training import evaluate, train_pretrain_net


class Pretrain(Stage):
    name = "pretrain"

    def settings(self, cfg: DictConfig, up: None) -> dict[str, Any]:
        return pretrain_settings(cfg)

    def location(self, cfg: DictConfig, up: None, signature: str) -> Path:
        return Path(cfg.output_root) / cfg.dataset.name / cfg.model.name / f"pretrain-{signature}"

    def compute(self, cfg: DictConfig, ctx: Context, up: None, folder: RunFolder) -> Trained:
        tasks = ctx.tasks(cfg)
        task = tasks.pretrain
        how = f"weights from {cfg.weights.pretrain}" if cfg.weights.pretrain else f"{cfg.train.pretrain.steps} steps"
        say(
            f"pretrain: {cfg.dataset.name} {what_is_learned(task.train)}, m={len(task.train):,} examples, "
            f"model {cfg.model.name}, {how} on {ctx.device}"
        )
        start = time.perf_counter()
        if cfg.weights.pretrain:  # trained elsewhere: the user's weights instead of training
            net = imported(
                cfg,
                ctx,
                "pretrain",
                build_pretrain_net(cfg.model, tasks.input_shape, task.num_classes, cfg.seed, ctx.dtype),
            )
            fit_stats = {"imported": str(Path(str(cfg.weights.pretrain)).expanduser().resolve())}
        else:
            net, fit_stats = train_pretrain_net(cfg, tasks, cfg.seed, ctx.device, ctx.dtype)
        bs = cfg.train.eval_batch_size
        metrics = {
            "stage": "pretrain",
            "m": len(task.train),
            "classes": task.train.class_names if not task.train.language_model else None,
            "train": evaluate(net, (task.train.x.to(ctx.device), task.train.y.to(ctx.device)), bs),
            "test": evaluate(net, (task.test.x.to(ctx.device), task.test.y.to(ctx.device)), bs),
            "fit": fit_stats,
            "parameters": {name: count_parameters(p) for name, p in parameter_groups(net).items()},
            "device": str(ctx.device),
            "seconds": time.perf_counter() - start,
        }
        if task.train.language_model:  # a language model: its vocabulary, and the perplexity to beat
            from msif.data.text import unigram_perplexity

            metrics["vocabulary"] = len(task.train.class_names)
            metrics["unigram_test_perplexity"] = unigram_perplexity(
                task.train.y, task.test.y, len(task.train.class_names)
            )
            atomic_write_text("".join(f"{w}\n" for w in task.train.class_names), folder.path / "vocabulary.txt")
        return save_trained(folder, net.cpu(), metrics, tasks, "pretrain", "pretrain")

    def load(self, cfg: DictConfig, ctx: Context, up: None, folder: RunFolder, path: Path | None = None) -> Trained:
        def build(input_shape, num_classes):
            return build_pretrain_net(cfg.model, input_shape, num_classes, cfg.seed, ctx.dtype)

        return load_trained(cfg, ctx, folder, path, "pretrain", build)


def what_is_learned(examples) -> str:
    """ "classes [...]", or for a language model the size of its vocabulary."""
    if examples.language_model:
        return f"next-token prediction over a vocabulary of {len(examples.class_names):,} tokens"
    return f"classes {examples.class_names}"


def imported(cfg: DictConfig, ctx: Context, stage: str, net):
    """`net` holding the weights of `weights.<stage>` (checked key by key against the network), in eval mode."""
    path = Path(str(cfg.weights[stage])).expanduser()
    load_weights(net, read_weights(path, to_plain(cfg.weights.rename)), path, stage)
    return net.to(ctx.device).eval()


def save_trained(folder: RunFolder, net, metrics: dict, tasks, stage: str, title: str) -> Trained:
    """Write the trained network's run (checkpoint last), show its summary table, and return it."""
    save_run(folder, state_of(net), metrics, shape_info(tasks, stage))
    console.print(trained_table(title, metrics))
    say(f"saved {folder.checkpoint}")
    return Trained(folder, net, metrics, folder.checkpoint)


def load_trained(cfg: DictConfig, ctx: Context, folder: RunFolder, path: Path | None, stage: str, build) -> Trained:
    """The network in the checkpoint at `path` (default: the folder's), checked against the folder's settings and
    rebuilt by `build(input_shape, num_classes)`."""
    path = path or folder.checkpoint
    ckpt = load_checkpoint(path, folder)
    net = build(*shape_from(ckpt, ctx, cfg, stage))
    load_state(net, ckpt["state"], path)
    return Trained(folder, net, read_json(path.parent / "metrics.json"), path)


def shape_info(tasks, stage: str) -> dict[str, Any]:
    """What a checkpoint records so its network can be rebuilt without loading the data."""
    task = getattr(tasks, stage)
    return {
        "input_shape": list(tasks.input_shape),
        "num_classes": task.num_classes,
        "class_names": list(task.train.class_names),
    }


def shape_from(ckpt: dict[str, Any], ctx: Context, cfg: DictConfig, stage: str) -> tuple[tuple[int, ...], int]:
    if "input_shape" in ckpt:
        return tuple(int(s) for s in ckpt["input_shape"]), int(ckpt["num_classes"])
    tasks = ctx.tasks(cfg)
    return tasks.input_shape, getattr(tasks, stage).num_classes


PRETRAIN = Pretrain()


def pretrain(cfg: DictConfig, ctx: Context | None = None) -> Trained:
    """Train (W, U) on the pretraining task, or reuse the finished run with the same settings."""
    return run(PRETRAIN, cfg, ctx)


def pretrained(cfg: DictConfig, ctx: Context) -> Trained:
    """The pretrained model these settings name: loaded, or made first when missing (if `upstream.auto`)."""
    return need(PRETRAIN, cfg, ctx)
