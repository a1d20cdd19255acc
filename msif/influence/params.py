"""Parameters as one flat vector, and the losses of docs/MATH.md as functions of that vector.

A network's parameters are ordered embedding first, then head, so the W block of a flat vector is its first
|W| entries and [u ; 0] is `torch.cat([u, zeros(|U|)])`. All Hessians and solves work on these flat vectors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

FlatLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class ParamSpace:
    """Named parameters <-> one flat vector, in the order of `names`."""

    def __init__(self, params: dict[str, torch.Tensor]):
        self.names = list(params)
        self.shapes = [tuple(p.shape) for p in params.values()]
        self.numels = [p.numel() for p in params.values()]
        self.size = sum(self.numels)

    def flatten(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([params[n].reshape(-1) for n in self.names])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(flat, self.numels)
        return {n: t.view(s) for n, t, s in zip(self.names, parts, self.shapes, strict=True)}

    def block(self, prefix: str) -> slice:
        """The contiguous slice of the flat vector holding the parameters whose names start with `prefix`."""
        idx = [i for i, n in enumerate(self.names) if n.startswith(prefix)]
        if not idx or idx != list(range(idx[0], idx[-1] + 1)):
            raise ValueError(f"parameters with prefix {prefix!r} are not one contiguous block")
        start = sum(self.numels[: idx[0]])
        return slice(start, start + sum(self.numels[i] for i in idx))


def network_space(net: nn.Module) -> tuple[ParamSpace, torch.Tensor]:
    """The flat space of a TwoStageNet (embedding W first, then the head) and its current point."""
    params = {k: v.detach() for k, v in net.named_parameters()}
    params = {
        **{k: v for k, v in params.items() if k.startswith("embedding.")},
        **{k: v for k, v in params.items() if not k.startswith("embedding.")},
    }
    space = ParamSpace(params)
    return space, space.flatten(params)


def summed_loss(net: nn.Module, space: ParamSpace) -> FlatLoss:
    """(flat, x, y) -> Σ_i cross-entropy(net(x_i), y_i) with the network's parameters set to `flat`."""

    def loss(flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(net, space.unflatten(flat), (x,)), y, reduction="sum")

    return loss


def per_example_loss(net: nn.Module, space: ParamSpace) -> FlatLoss:
    """(flat, x, y) -> the vector of per-example cross-entropies."""

    def loss(flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(net, space.unflatten(flat), (x,)), y, reduction="none")

    return loss


@torch.no_grad()
def embed(embedding: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Flattened embedding features of `x`, computed in batches."""
    return torch.cat([embedding(x[i : i + batch_size]).flatten(1) for i in range(0, len(x), batch_size)])
