"""Step 5: I(z, T) = −⟨s, ∇_{(W,U)} g(z)⟩ for every pretraining example z, batch by batch.

One target (K = 1): a forward-mode directional derivative of the per-example loss vector along s gives a whole
batch of scores in one pass (torch.func.jvp), with no per-example gradient ever stored. Several targets (K > 1):
per-example gradients of the batch (torch.func.vmap of grad) contracted with the K solved vectors at once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import grad, jvp, vmap

from msif.influence.params import FlatLoss

# per-example gradients are formed for at most this many (example x parameter) entries at a time
PER_EXAMPLE_BUDGET = 2**25


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
) -> torch.Tensor:
    """Scores (m, K): −⟨S_k, ∇g(z_i)⟩ for each example i of (x, y) and each row S_k."""
    K = len(S)
    out = torch.empty(len(y), K, dtype=S.dtype)
    if K > 1:
        batch_size = max(1, min(batch_size, PER_EXAMPLE_BUDGET // max(1, point.numel())))
    for i in range(0, len(y), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        if K == 1:
            _, directional = jvp(lambda q, xb=xb, yb=yb: per_example(q, xb, yb), (point,), (S[0],))
            out[i : i + len(yb), 0] = -directional.detach().cpu()
        else:
            grads = vmap(grad(summed), in_dims=(None, 0, 0))(point, xb.unsqueeze(1), yb.unsqueeze(1))
            out[i : i + len(yb)] = -(grads @ S.T).detach().cpu()
        if on_batch is not None:
            on_batch(len(yb))
    return out
