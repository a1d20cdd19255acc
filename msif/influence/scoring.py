"""Step 5: I(z, T) = −⟨s, ∇_{(W,U)} g(z)⟩ for every pretraining example z, batch by batch.

Two ways to score a batch against K solved vectors, with the same numbers (up to rounding):

* `jvp`: forward-mode directional derivatives of the per-example loss vector along each s (torch.func.jvp, vmapped
  over the K directions): no per-example gradient is ever stored; cost grows with K.
* `per_example`: per-example gradients of the batch (torch.func.vmap of grad) contracted with all K vectors at once:
  one backward-sized pass whatever K, memory batch × parameters.

`method="auto"` uses jvp for one target, and for several times both on the first batch and keeps the faster (the
choice is reported); pin it with score.method=jvp|per_example when bit-identical reruns across machines matter.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.func import grad, jvp, vmap

from msif.influence.params import FlatLoss

# per-example gradients are formed for at most this many (example x parameter) entries at a time
PER_EXAMPLE_BUDGET = 2**25
JVP_CHUNK = 16  # directions vmapped together in one forward-mode pass
# examples per forward-mode pass, whatever the batch size: larger passes allocate activation tangents above glibc's
# 32 MiB mmap threshold, which are then mapped and page-faulted afresh for every batch (docs/speed.md).
JVP_ROWS = 128
AUTO_MEASURE_MAX_K = 64  # auto measures both ways only up to this many targets; above it, per-example gradients


METHODS = ("auto", "jvp", "per_example")


def score_examples(
    per_example: FlatLoss,
    summed: FlatLoss,
    point: torch.Tensor,
    S: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    device: torch.device,
    on_batch: Callable[[int], None] | None = None,
    method: str = "auto",
    chosen: dict | None = None,
) -> torch.Tensor:
    """Scores (m, K): −⟨S_k, ∇g(z_i)⟩ for each example i of (x, y) and each row S_k. `chosen` (a dict) receives
    the method used and, for auto, the measured seconds of both on the first batch."""
    K = len(S)
    out = torch.empty(len(y), K, dtype=S.dtype)
    pe_batch = max(1, min(batch_size, PER_EXAMPLE_BUDGET // max(1, point.numel())))

    def by_jvp(xb, yb):
        return torch.cat([_jvp_rows(xb[r : r + JVP_ROWS], yb[r : r + JVP_ROWS]) for r in range(0, len(yb), JVP_ROWS)])

    def _jvp_rows(xb, yb):
        def directional(s):
            return jvp(lambda q: per_example(q, xb, yb), (point,), (s,))[1]

        if K == 1:
            return directional(S[0]).unsqueeze(1).detach()
        # vmapped directions hold a tangent of every activation each: JVP_CHUNK of them at a time bounds the memory
        return torch.cat([vmap(directional)(S[j : j + JVP_CHUNK]).T for j in range(0, K, JVP_CHUNK)], 1).detach()

    def by_grads(xb, yb):
        rows = []
        for j in range(0, len(yb), pe_batch):
            g = vmap(grad(summed), in_dims=(None, 0, 0))(
                point, xb[j : j + pe_batch].unsqueeze(1), yb[j : j + pe_batch].unsqueeze(1)
            )
            rows.append(g @ S.T)
        return torch.cat(rows).detach()

    ways = {"jvp": by_jvp, "per_example": by_grads}
    use = "jvp" if method == "auto" and K == 1 else method
    if use == "auto" and K > AUTO_MEASURE_MAX_K:  # jvp costs K passes: per-example gradients win, no need to measure
        use = "per_example"
    info = chosen if chosen is not None else {}
    for i in range(0, len(y), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        if use == "auto":  # measure both on this first batch, keep the faster
            seconds, blocks = {}, {}
            for name, fn in ways.items():
                start = time.perf_counter()
                blocks[name] = fn(xb, yb)
                seconds[name] = time.perf_counter() - start
            use = min(seconds, key=seconds.get)
            info["measured_seconds"] = seconds
            block = blocks[use]
        else:
            block = ways[use](xb, yb)
        out[i : i + len(yb)] = -block.cpu()
        if on_batch is not None:
            on_batch(len(yb))
    info["method"] = use
    return out


def score_network(
    net,
    space,
    point: torch.Tensor,
    S: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    device: torch.device,
    method: str,
    chosen: dict,
    what: str,
) -> torch.Tensor:
    """`score_examples` for a network in its flat parameter space, with a (transient) progress bar."""
    from msif.influence.params import per_example_loss, summed_loss
    from msif.progress import progress

    with progress(transient=True) as bar:
        task = bar.add_task(f"scoring {what}", total=len(y), info="")
        return score_examples(
            per_example_loss(net, space),
            summed_loss(net, space),
            point,
            S.detach(),
            x,
            y,
            batch_size,
            device,
            lambda k: bar.advance(task, k),
            method=method,
            chosen=chosen,
        )
