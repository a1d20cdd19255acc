"""Hessians of mean losses, applied to vectors by automatic differentiation (never materialised, except `dense`).

H = ∇² (1/N) Σ_i ℓ_i at a point, over fixed batches; `matvec` applies H (+ an optional diagonal shift) to a block of
K vectors at once, in one of two ways with the same numbers (up to rounding):

* kept graphs (when they fit in `graph_budget` bytes, 6 GiB by default): the gradient of each batch is formed once
  with its graph kept (create_graph), and every later H v is one backward pass through it (reverse-over-reverse,
  no forward pass), which skips the forward pass and the first backward that forward-over-reverse repeats.
* otherwise forward-over-reverse (torch.func.jvp of torch.func.grad, vmapped over the K directions), which recomputes
  the batch's forward and backward for each product; memory O(parameters × K + one batch).

The graph size is estimated on the first batch (the bytes of the tensors autograd saves) before the others are kept,
and the process's resident memory is watched while they are built (the graphs are dropped when it outgrows the budget);
the graphs are dropped by `release()` (the solvers call it when a solve ends), so they never outlive a solve.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import torch
from torch.func import grad, jvp, vmap

from msif import distributed
from msif.influence.batches import batch_size, leaves
from msif.influence.params import FlatLoss

log = logging.getLogger(__name__)

# Kept gradient graphs of all batches together stay under this (0: never keep them). 6 GiB holds the graphs of
# CIFAR-10's 2,500-example pretrain Hessian (4.05 GB; HVPs 11.5-13 s instead of 19 s) on a 24 GB machine.
GRAPH_BUDGET_BYTES = 6 * 2**30


class Hessian:
    """H = ∇² of (1/N) Σ over `batches` of `loss(point, batch)` (+ diag(`shift`)), at the flat vector `point`; N is
    the number of examples in the batches (msif.influence.batches: any pytree of tensors, e.g. (x, y))."""

    def __init__(
        self,
        loss: FlatLoss,
        point: torch.Tensor,
        batches: list,
        shift: torch.Tensor | None = None,
        chunk: int = 32,
        *,
        graph_budget: int = GRAPH_BUDGET_BYTES,
        cache_dir: str | Path | None = None,
    ):
        self.loss = loss
        self.point = point.detach()
        self.batches = batches
        self.n = sum(batch_size(b) for b in batches)
        self.shift = shift
        self.chunk = chunk
        self.calls = 0  # Hessian-vector products applied (one per direction)
        self.seconds = 0.0
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None  # fitted curvature kept here, if set
        self.ritz_pairs: dict = {}  # (rank, seed) -> RitzCurvature fitted on this H (msif.influence.curvature)
        self.graph_budget = int(graph_budget)  # bytes the kept gradient graphs may take; 0: never keep them
        self.graph_bytes: int | None = None  # measured size of the kept graphs (None: not measured yet)
        self._graphs: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # (leaf point, its gradient) per batch

    @property
    def size(self) -> int:
        return self.point.numel()

    def matvec(self, V: torch.Tensor, *, once: bool = False) -> torch.Tensor:
        """H @ v for every row v of V (K, p) -> (K, p). `once`: a product not repeated, which uses graphs already
        kept but never builds them (building one costs the forward and backward it would save)."""
        start = time.perf_counter()
        graphs = self._graphs if once else self._kept_graphs()
        out = self._through_graphs(graphs, V) if graphs is not None else self._forward_over_reverse(V)
        distributed.all_reduce_sum(out)
        out /= self.n
        if self.shift is not None:
            out += self.shift * V
        self.calls += len(V)
        self.seconds += time.perf_counter() - start
        return out

    def release(self) -> None:
        """Drop the kept gradient graphs (they are rebuilt by the next `matvec`)."""
        self._graphs = None

    def _kept_graphs(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Each batch's (leaf point q, ∇ Σ loss at q with its graph), built on first use when they fit the budget."""
        if self._graphs is not None or self.graph_budget <= 0:
            return self._graphs
        mine = distributed.shard(self.batches)  # under torchrun each process keeps the graphs of its own share
        if not mine:
            return None
        if self.graph_bytes is not None and self.graph_bytes > self.graph_budget:
            return None
        graphs = []
        start = _resident_bytes()
        with torch.enable_grad():
            for i, batch in enumerate(mine):
                q = self.point.clone().requires_grad_(True)
                if i == 0 and self.graph_bytes is None:
                    first, g = _saved_bytes(lambda q=q, batch=batch: self._gradient_graph(q, batch))
                    self.graph_bytes = first * len(mine)  # batches are of equal size but the last
                    if self.graph_bytes > self.graph_budget:
                        return None
                else:
                    g = self._gradient_graph(q, batch)
                graphs.append((q, g))
                # The saved-tensor count misses what autograd holds outside saved tensors (on the text LSTM the
                # 2 GiB budget let the process reach 13.9 GB resident): the process's own growth is the check.
                grown = None if start is None else _resident_bytes() - start
                if grown is not None and grown > self.graph_budget:
                    log.info(
                        "kept gradient graphs outgrew the budget (%.2f GiB after %d of %d batches): dropped",
                        grown / 2**30,
                        i + 1,
                        len(mine),
                    )
                    self.graph_bytes = max(self.graph_bytes, grown * len(mine) // (i + 1))  # not retried
                    return None
        self._graphs = graphs
        return graphs

    def _gradient_graph(self, q: torch.Tensor, batch) -> torch.Tensor:
        return torch.autograd.grad(self.loss(q, batch), q, create_graph=True)[0]

    def _through_graphs(self, graphs, V: torch.Tensor) -> torch.Tensor:
        """Σ over kept batches of ∇(gᵀv) = H_batch v: one backward pass per batch (and per chunk of directions)."""
        out = torch.zeros_like(V)
        with torch.enable_grad():
            for q, g in graphs:
                for i in range(0, len(V), self.chunk):
                    block = V[i : i + self.chunk]
                    if len(block) == 1:
                        out[i : i + 1] += torch.autograd.grad(g, q, block[0], retain_graph=True)[0]
                    else:
                        out[i : i + self.chunk] += torch.autograd.grad(
                            g, q, block, retain_graph=True, is_grads_batched=True
                        )[0]
        return out

    def _forward_over_reverse(self, V: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(V)
        for batch in distributed.shard(self.batches):  # under torchrun each process sums its share, then all-reduce

            def batch_grad(q, batch=batch):
                return grad(self.loss)(q, batch)

            def hvp(v, batch_grad=batch_grad):
                return jvp(batch_grad, (self.point,), (v,))[1]

            for i in range(0, len(V), self.chunk):
                block = V[i : i + self.chunk]
                out[i : i + self.chunk] += hvp(block[0]).unsqueeze(0) if len(block) == 1 else vmap(hvp)(block)
        return out

    def fingerprint(self) -> str:
        """A short hash of what determines H: the point, the examples it sums over, and the shift."""
        h = hashlib.sha256()
        for t in (self.point, *(t for batch in self.batches for t in leaves(batch))):
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        h.update(
            repr(
                None
                if self.shift is None
                else float(self.shift)
                if not torch.is_tensor(self.shift)
                else self.shift.sum().item()
            ).encode()
        )
        return h.hexdigest()[:16]

    def dense(self) -> torch.Tensor:
        """The explicit (p, p) matrix, column block by column block (for the `exact` solver on small models)."""
        eye = torch.eye(self.size, dtype=self.point.dtype, device=self.point.device)
        cols = [self.matvec(eye[i : i + 256]) for i in range(0, self.size, 256)]
        H = torch.cat(cols)
        return (H + H.T) / 2  # symmetric up to rounding


def _resident_bytes() -> int | None:
    """This process's resident memory in bytes (Linux /proc), or None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _saved_bytes(build):
    """(bytes of the distinct storages autograd saves while `build()` runs, build()'s result)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = build()
    return sum(seen.values()), result
