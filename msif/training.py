"""Plain training and evaluation loops used by both stages (and, later, by leave-one-out retraining).

Determinism: the batch order comes from its own seeded generator, independent of the initialisation RNG, so the
same seed and settings on the same machine give bit-identical parameters.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from msif.data import Examples, Tasks
from msif.errors import MsifError
from msif.influence.params import IGNORE, embed, example_losses
from msif.models import build_finetune_net, build_pretrain_net
from msif.progress import progress


def batch_schedule(
    n: int, batch_size: int, steps: int, seed: int, examples: int | None = None
) -> Iterator[torch.Tensor]:
    """Indices of each step's batch: consecutive slices of a stream of seeded random permutations of range(n).

    A batch may straddle two permutations, so every example is seen once per n/batch_size steps. `examples` ends the
    stream after that many examples (the last batch shorter): with examples = E·n every example is seen exactly E
    times (`epoch_steps`).
    """
    gen = torch.Generator().manual_seed(seed)
    bs = min(batch_size, n)
    perm, pos = torch.randperm(n, generator=gen), 0
    left = math.inf if examples is None else int(examples)
    for _ in range(steps):
        parts, need = [], int(min(bs, left))
        left -= need
        if need <= 0:
            return
        while need > 0:
            if pos == n:
                perm, pos = torch.randperm(n, generator=gen), 0
            take = min(need, n - pos)
            parts.append(perm[pos : pos + take])
            pos, need = pos + take, need - take
        yield parts[0] if len(parts) == 1 else torch.cat(parts)


def epoch_steps(n: int, batch_size: int, epochs: int) -> tuple[int, int]:
    """(steps, examples) of `epochs` whole passes over n examples in batches of `batch_size`: every example seen
    exactly `epochs` times, the last batch shorter when batch_size does not divide epochs·n."""
    examples = int(epochs) * n
    return math.ceil(examples / min(batch_size, n)), examples


def retrain_schedule(
    n: int, batch_size: int, steps: int | None, epochs: int | None, fallback: int
) -> tuple[int, int | None]:
    """(steps, examples) of a warm-start pretraining retrain over n examples: `steps` steps when given; else `epochs`
    whole passes (`epoch_steps`); else `fallback` steps. examples is None where the count is by steps."""
    if steps is not None:
        return int(steps), None
    if epochs:
        return epoch_steps(n, batch_size, int(epochs))
    return int(fallback), None


def exposure(n: int, batch_size: int, steps: int, seed: int, examples: int | None = None) -> torch.Tensor:
    """How many of the schedule's batches each of the n examples appears in."""
    counts = torch.zeros(n, dtype=torch.long)
    for idx in batch_schedule(n, batch_size, steps, seed, examples):
        counts += torch.bincount(idx, minlength=n)
    return counts


REMOVALS = ("zero_weight", "drop")


def make_optimizer(params: list[torch.Tensor], t: DictConfig) -> torch.optim.Optimizer:
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(params, lr=t.lr, weight_decay=t.weight_decay)


def fit(
    model: nn.Module,
    params: list[torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    t: DictConfig,
    seed: int,
    description: str,
    penalty: Callable[[], torch.Tensor] | None = None,
    *,
    steps: int | None = None,
    examples: int | None = None,
    exclude: int | torch.Tensor | None = None,
    removal: str = "zero_weight",
    record: list[torch.Tensor] | None = None,
    weights: list[torch.Tensor] | None = None,
    show_progress: bool = True,
) -> dict:
    """Minimise mean cross-entropy of `model(x)` (+ `penalty()`) over `params` for `t.steps` (or `steps`) steps
    (`examples`: stop after that many examples, see `batch_schedule`).

    `exclude` removes one example (a row of x), or a set of rows, from every batch it would appear in, leaving the
    batch order of all other examples unchanged: the leave-one-out retrain differs from its reference in that
    example alone. `removal` says how: `zero_weight` (the default) gives it weight zero and keeps every other
    example's weight 1/b, as the influence function's removal (ε = −1/m in G) does; `drop` takes the mean over the
    others, which up-weights each of them by b/(b − 1): an extra step along that batch's mean gradient that z has
    no part in.
    `record` receives each step's batch indices (without the excluded example), `weights` each step's per-example
    loss weights over the whole batch (z included, with its weight). Returns the mean training loss over the last
    10% of steps, the wall time and the throughput.
    """
    if removal not in REMOVALS:
        raise ValueError(f"removal must be one of {REMOVALS}, not {removal!r}")
    excluded = None  # rows removed from every batch: one example (leave-one-out) or a set (LDS subsets)
    if exclude is not None:
        excluded = torch.zeros(len(y), dtype=torch.bool)
        excluded[torch.as_tensor(exclude, dtype=torch.long)] = True
    steps = t.steps if steps is None else steps
    opt = make_optimizer(params, t)
    was_training = model.training
    model.train()  # batch statistics and dropout while training; the caller's mode (eval) again afterwards
    losses: list[float] = []
    start = time.perf_counter()
    seen = 0
    bar = progress() if show_progress else nullcontext(None)
    try:
        with bar:
            task = bar.add_task(description, total=steps, info="") if show_progress else None
            for step, idx in enumerate(batch_schedule(len(y), t.batch_size, steps, seed, examples)):
                b = len(idx)
                out = excluded[idx] if excluded is not None else None
                hit = out is not None and bool(out.any())
                if weights is not None:
                    w = torch.full((b,), 1.0 / b, dtype=torch.float64)
                    if hit:
                        other = 1.0 / b if removal == "zero_weight" else 1.0 / max(b - int(out.sum()), 1)
                        w = torch.where(out, 0.0, other).double()
                    weights.append(w)
                if hit:
                    idx = idx[~out]
                if record is not None:
                    record.append(idx)
                if len(idx) == 0:
                    continue
                if hit and removal == "zero_weight":  # the sum over the others, still divided by the whole batch
                    loss = batch_loss(model(x[idx]), y[idx], "sum") / b
                else:  # the mean (a batch without z: bit for bit the reference's step)
                    loss = batch_loss(model(x[idx]), y[idx], "mean")
                if penalty is not None:
                    loss = loss + penalty()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                if not math.isfinite(losses[-1]):
                    raise MsifError(
                        f"Training diverged: the loss is {losses[-1]} at step {step + 1} of "
                        f"{description or 'training'} (lr {t.lr:g}, {t.optimizer}), so no checkpoint is saved.",
                        "Lower the learning rate (train.pretrain.lr / train.finetune.lr).",
                    )
                seen += len(idx)
                if show_progress and (step % 10 == 0 or step == steps - 1):
                    rate = seen / max(time.perf_counter() - start, 1e-9)
                    bar.update(task, completed=step + 1, info=f"loss {losses[-1]:.4f}  {rate:,.0f} ex/s")
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    tail = losses[-max(1, len(losses) // 10) :] or [float("nan")]
    return {
        "steps": steps,
        "final_train_loss": sum(tail) / len(tail),
        "seconds": seconds,
        "examples_per_second": seen / max(seconds, 1e-9),
    }


def train_finetune_net(
    net: nn.Module,
    cfg: DictConfig,
    x: torch.Tensor,
    y: torch.Tensor,
    seed: int,
    steps: int | None = None,
    show_progress: bool = True,
    standardize: bool = False,
) -> dict:
    """Finetune `net` in place as the case says: Θ alone on features computed once (fixed), or W and Θ together,
    with the proximal term α‖W − W̄‖² around the starting embedding W̄ when `case.proximal` (updated).
    `standardize` (a fresh head; a retrain keeps its map) first fixes the head's input map from the starting W's
    training features."""
    t = cfg.train.finetune
    if cfg.case.name != "updated":
        for p in net.embedding.parameters():
            p.requires_grad_(False)
        features = embed(net.embedding, x, cfg.train.eval_batch_size)  # W is frozen: embed once, train Θ only
        if standardize:
            net.head.standardize(features)
        return fit(
            net.head,
            list(net.head.parameters()),
            features,
            y,
            t,
            seed,
            "finetune Θ",
            steps=steps,
            show_progress=show_progress,
        )
    if standardize:
        with torch.no_grad():
            net.head.standardize(embed(net.embedding, x, cfg.train.eval_batch_size))
    penalty = None
    if cfg.case.get("proximal", False):
        alpha = float(cfg.case.alpha)
        anchor = [p.detach().clone() for p in net.embedding.parameters()]

        def penalty() -> torch.Tensor:
            return alpha * squared_distance(net.embedding.parameters(), anchor)

    return fit(
        net, list(net.parameters()), x, y, t, seed, "finetune W, Θ", penalty, steps=steps, show_progress=show_progress
    )


def train_pretrain_net(
    cfg: DictConfig,
    tasks: Tasks,
    seed: int,
    device,
    dtype,
    rows=None,
    record: list | None = None,
    show_progress: bool = True,
    start: nn.Module | None = None,
    steps: int | None = None,
):
    """(W, U) trained on the pretraining examples `rows` (all when None) with the pretraining recipe, `steps` steps
    (the recipe's when None): (net, fit stats). The network is freshly initialised from `seed`, or a copy of `start`
    to continue training it. `record` receives each step's batch as rows of the pretraining set."""
    task = tasks.pretrain
    if start is None:
        net = build_pretrain_net(cfg.model, tasks.input_shape, task.num_classes, seed, dtype).to(device)
    else:
        net = copy.deepcopy(start).to(device)
        for p in net.parameters():
            p.requires_grad_(True)
    x, y = task.train.x, task.train.y
    if rows is not None:
        x, y = x[rows], y[rows]
    steps_seen: list | None = [] if record is not None else None
    stats = fit(
        net,
        list(net.parameters()),
        x.to(device),
        y.to(device),
        cfg.train.pretrain,
        seed,
        "pretrain" if start is None else "pretrain (continued)",
        steps=steps,
        record=steps_seen,
        show_progress=show_progress,
    )
    if record is not None:
        record.extend(idx if rows is None else rows[idx] for idx in steps_seen)
    return net, stats


def finetune_from(cfg: DictConfig, tasks: Tasks, embedding, seed: int, device, dtype, show_progress: bool = True):
    """A fresh finetune head Θ on a copy of `embedding`, trained as `cfg.case` says: (net, fit stats)."""
    task = tasks.finetune
    net = build_finetune_net(cfg.model, copy.deepcopy(embedding), tasks.input_shape, task.num_classes, seed, dtype).to(
        device
    )
    x, y = task.train.x.to(device), task.train.y.to(device)
    standardize = bool(cfg.train.finetune.get("standardize", False))
    return net, train_finetune_net(net, cfg, x, y, seed, show_progress=show_progress, standardize=standardize)


def batch_loss(logits: torch.Tensor, y: torch.Tensor, reduction: str) -> torch.Tensor:
    """The sum or mean over a batch of the per-example losses (msif.influence.params.example_losses); class logits
    go through F.cross_entropy's own reduction, as they always have (bit for bit the same steps)."""
    if logits.dim() == 2:
        return F.cross_entropy(logits, y, reduction=reduction)
    each = example_losses(logits, y)
    return each.sum() if reduction == "sum" else each.mean()


@torch.no_grad()
def evaluate(model: nn.Module, data: Examples | tuple[torch.Tensor, torch.Tensor], batch_size: int) -> dict:
    """Mean cross-entropy and accuracy of `model` on `data`, in eval mode (running statistics, no dropout); the
    model is left in the mode it came in."""
    x, y = (data.x, data.y) if isinstance(data, Examples) else data
    total, correct = 0.0, 0
    token_loss, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    for i in range(0, len(y), batch_size):
        logits, target = model(x[i : i + batch_size]), y[i : i + batch_size]
        total += batch_loss(logits, target, "sum").item()
        if logits.dim() == 2:
            correct += (logits.argmax(1) == target).sum().item()
        else:  # a language model: next-token accuracy and the loss per token, for the perplexity
            kept = target != IGNORE
            correct += (logits.argmax(-1) == target)[kept].sum().item()
            token_loss += F.cross_entropy(logits[kept], target[kept], reduction="sum").item()
            tokens += int(kept.sum())
    model.train(was_training)
    if tokens:
        return {
            "loss": total / len(y),
            "accuracy": correct / tokens,
            "perplexity": math.exp(token_loss / tokens),
            "tokens": tokens,
            "n": len(y),
        }
    return {"loss": total / len(y), "accuracy": correct / len(y), "n": len(y)}


def squared_distance(params, anchor: list[torch.Tensor]) -> torch.Tensor:
    """‖W − W̄‖² summed over matching parameter tensors."""
    return sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
