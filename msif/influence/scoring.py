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
from collections.abc import Callable, Iterable

import torch
from torch.func import grad, jvp, vmap

from msif.errors import MsifError
from msif.influence.batches import batch_size, take, to_device
from msif.influence.batches import per_example as as_single
from msif.influence.params import FlatLoss

# per-example gradients are formed for at most this many (example x parameter) entries at a time
PER_EXAMPLE_BUDGET = 2**25
JVP_CHUNK = 16  # directions vmapped together in one forward-mode pass
# examples per forward-mode pass, whatever the batch size: larger passes allocate activation tangents above glibc's
# 32 MiB mmap threshold, which are then mapped and page-faulted afresh for every batch (docs/speed.md).
JVP_ROWS = 128
AUTO_MEASURE_MAX_K = 64  # auto measures both ways only up to this many targets; above it, per-example gradients


METHODS = ("auto", "jvp", "per_example")


def factored(S: torch.Tensor, report) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(C, U) when the solve that gave S answered S = C U with fewer basis rows U than targets (`lowrank`), else
    None. A score is linear in s, so scoring the examples against U and combining by Cᵀ gives the same numbers up
    to rounding, in len(U) directions instead of len(S)."""
    factors = getattr(report, "factors", None)
    if factors is None or len(factors[1]) >= len(S):
        return None
    return factors


def score_solved(score: Callable, S: torch.Tensor, report, indices=None) -> torch.Tensor:
    """score(S, indices), through the solve's basis when it has fewer rows than S (`factored`)."""
    factors = factored(S, report)
    if factors is None:
        return score(S, indices)
    coefficients, basis = factors
    return score(basis, indices) @ coefficients.T.to(basis.dtype)


def score_examples(
    per_example: FlatLoss,
    summed: FlatLoss,
    point: torch.Tensor,
    S: torch.Tensor,
    batches: Iterable,
    m: int,
    device: torch.device,
    on_batch: Callable[[int], None] | None = None,
    method: str = "auto",
    chosen: dict | None = None,
) -> torch.Tensor:
    """Scores (m, K): −⟨S_k, ∇g(z_i)⟩ for each example i of the `batches` (m examples in all, streamed: one batch is
    held at a time) and each row S_k. `chosen` (a dict) receives the method used and, for auto, the measured seconds
    of both on the first batch."""
    K = len(S)
    out = torch.empty(m, K, dtype=S.dtype)
    pe_batch = max(1, PER_EXAMPLE_BUDGET // max(1, point.numel()))

    def by_jvp(b, n):
        return torch.cat([_jvp_rows(take(b, slice(r, r + JVP_ROWS))) for r in range(0, n, JVP_ROWS)])

    def _jvp_rows(b):
        def directional(s):
            return jvp(lambda q: per_example(q, b), (point,), (s,))[1]

        if K == 1:
            return directional(S[0]).unsqueeze(1).detach()
        # vmapped directions hold a tangent of every activation each: JVP_CHUNK of them at a time bounds the memory
        return torch.cat([vmap(directional)(S[j : j + JVP_CHUNK]).T for j in range(0, K, JVP_CHUNK)], 1).detach()

    def by_grads(b, n):
        rows = []
        for j in range(0, n, pe_batch):
            g = vmap(grad(summed), in_dims=(None, 0))(point, as_single(take(b, slice(j, j + pe_batch))))
            rows.append(g @ S.T)
        return torch.cat(rows).detach()

    ways = {"jvp": by_jvp, "per_example": by_grads}
    use = "jvp" if method == "auto" and K == 1 else method
    if use == "auto" and K > AUTO_MEASURE_MAX_K:  # jvp costs K passes: per-example gradients win, no need to measure
        use = "per_example"
    info = chosen if chosen is not None else {}
    i = 0
    for b in batches:
        b = to_device(b, device)
        n = batch_size(b)
        if i + n > m:
            raise MsifError(
                f"The data yielded more than the {m:,} examples they were counted as.",
                "Pass data that yield the same examples on every pass (no random augmentation, a fixed order).",
            )
        if use == "auto":  # measure both on this first batch, keep the faster
            seconds, blocks = {}, {}
            for name, fn in ways.items():
                start = time.perf_counter()
                blocks[name] = fn(b, n)
                seconds[name] = time.perf_counter() - start
            use = min(seconds, key=seconds.get)
            info["measured_seconds"] = seconds
            block = blocks[use]
        else:
            block = ways[use](b, n)
        out[i : i + n] = -block.cpu()
        i += n
        if on_batch is not None:
            on_batch(n)
    if i != m:
        raise MsifError(
            f"The data yielded {i:,} examples where {m:,} were expected.",
            "Pass data that yield the same examples on every pass (no random augmentation, a fixed order).",
        )
    info["method"] = use
    return out


def score_network(
    net,
    space,
    point: torch.Tensor,
    S: torch.Tensor,
    batches: Iterable,
    m: int,
    device: torch.device,
    method: str,
    chosen: dict,
    what: str,
    objective=None,
    fixed: dict | None = None,
) -> torch.Tensor:
    """`score_examples` for a network in its flat parameter space, with a (transient) progress bar."""
    from msif.influence.params import cross_entropy, per_example_loss, summed_loss
    from msif.progress import progress

    objective = objective or cross_entropy
    with progress(transient=True) as bar:
        task = bar.add_task(f"scoring {what}", total=m, info="")
        return score_examples(
            per_example_loss(net, space, objective, fixed),
            summed_loss(net, space, objective, fixed),
            point,
            S.detach(),
            batches,
            m,
            device,
            lambda k: bar.advance(task, k),
            method=method,
            chosen=chosen,
        )
