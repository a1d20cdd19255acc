"""Hessians of mean losses, applied to vectors by automatic differentiation (never materialised, except `dense`).

H = ∇² (1/N) Σ_i ℓ_i at a point, over fixed batches; `matvec` applies H (+ an optional diagonal shift) to a block of
K vectors at once (forward-over-reverse: torch.func.jvp of torch.func.grad, vmapped over the K directions).
Memory is O(parameters × K + one batch).
"""

from __future__ import annotations

import hashlib
import time

import torch
from torch.func import grad, jvp, vmap

from msif import distributed
from msif.influence.params import FlatLoss


class Hessian:
    """H = ∇² of (1/N) Σ over `batches` of `loss(point, x, y)` (+ diag(`shift`)), at the flat vector `point`."""

    def __init__(
        self,
        loss: FlatLoss,
        point: torch.Tensor,
        batches: list[tuple[torch.Tensor, torch.Tensor]],
        shift: torch.Tensor | None = None,
        chunk: int = 32,
    ):
        self.loss = loss
        self.point = point.detach()
        self.batches = batches
        self.n = sum(len(y) for _, y in batches)
        self.shift = shift
        self.chunk = chunk
        self.calls = 0  # Hessian-vector products applied (one per direction)
        self.seconds = 0.0
        self.cache_dir = None  # where fitted curvature (msif.influence.curvature) is kept between runs, if anywhere

    @property
    def size(self) -> int:
        return self.point.numel()

    def matvec(self, V: torch.Tensor) -> torch.Tensor:
        """H @ v for every row v of V (K, p) -> (K, p)."""
        start = time.perf_counter()
        out = torch.zeros_like(V)
        for x, y in distributed.shard(self.batches):  # under torchrun each process sums its share, then all-reduce

            def batch_grad(q, x=x, y=y):
                return grad(self.loss)(q, x, y)

            def hvp(v, batch_grad=batch_grad):
                return jvp(batch_grad, (self.point,), (v,))[1]

            for i in range(0, len(V), self.chunk):
                block = V[i : i + self.chunk]
                out[i : i + self.chunk] += hvp(block[0]).unsqueeze(0) if len(block) == 1 else vmap(hvp)(block)
        distributed.all_reduce_sum(out)
        out /= self.n
        if self.shift is not None:
            out += self.shift * V
        self.calls += len(V)
        self.seconds += time.perf_counter() - start
        return out

    def fingerprint(self) -> str:
        """A short hash of what determines H: the point, the examples it sums over, and the shift."""
        h = hashlib.sha256()
        for t in (self.point, *(t for batch in self.batches for t in batch)):
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
