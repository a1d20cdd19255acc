"""Parameters as one flat vector, and the losses of docs/MATH.md as functions of that vector.

A network's parameters are split by name into the embedding W (shared by both stages), the stage's own head (U or
Θ) and, optionally, embedding parameters held fixed (not tracked: an approximation for large backbones, like
Kronfluence's tracked modules). The flat vector orders W first, then the head, so the W block is its first |W|
entries and [u ; 0] is `torch.cat([u, zeros(|U|)])`. All Hessians and solves work on these flat vectors.

The loss is a small protocol, `Objective`: (network, parameters by name, batch) -> the per-example losses of the
batch, a (b,) tensor. `cross_entropy` (mean cross-entropy of `net(x)` against class indices y, batches `(x, y)`) is
the default; a language-model loss over dict batches is a few lines (see the README's Python API section).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from msif.errors import MsifError

# (flat parameter vector, batch) -> a scalar (summed) or (b,) (per-example) loss
FlatLoss = Callable[[torch.Tensor, Any], torch.Tensor]

DEFAULT_EMBEDDING = ("embedding.*",)


class Objective(Protocol):
    """Per-example losses of a batch under the given parameters: `(net, params, batch) -> Tensor (b,)`. `params`
    maps parameter names to tensors; evaluate the network with `torch.func.functional_call(net, params, inputs)`
    (names it leaves out keep the module's own values). It must be a pure function of `params` and `batch` (no
    in-place updates, no randomness: the network is in eval mode)."""

    def __call__(self, net: nn.Module, params: dict[str, torch.Tensor], batch: Any) -> torch.Tensor: ...


IGNORE = -100  # a target position no loss is taken at (a language model's padding)


def example_losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss of each example, (b,): cross-entropy of class logits (b, C) against y (b,); for a sequence,
    logits (b, L, V) against targets (b, L), the mean over the example's positions whose target is not IGNORE
    (a language model's per-sentence mean token cross-entropy)."""
    if logits.dim() == 2:
        return F.cross_entropy(logits, y, reduction="none")
    each = F.cross_entropy(logits.transpose(1, 2), y, reduction="none", ignore_index=IGNORE)
    return each.sum(1) / (y != IGNORE).sum(1).clamp_min(1)


def cross_entropy(net: nn.Module, params: dict[str, torch.Tensor], batch) -> torch.Tensor:
    """The default objective: cross-entropy of net(x) against the class indices y, for batches (x, y); for a network
    that predicts a sequence, the mean token cross-entropy of each example (`example_losses`)."""
    x, y = batch[0], batch[1]
    return example_losses(functional_call(net, params, (x,)), y)


class ParamSpace:
    """Named parameters <-> one flat vector, in the order of `names`; `W` is the slice of the embedding block."""

    def __init__(self, params: dict[str, torch.Tensor], n_embedding: int = 0):
        self.names = list(params)
        self.shapes = [tuple(p.shape) for p in params.values()]
        self.numels = [p.numel() for p in params.values()]
        self.size = sum(self.numels)
        self.W = slice(0, sum(self.numels[:n_embedding]))
        self.embedding_names = self.names[:n_embedding]

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


def globs(patterns: str | Sequence[str] | None, default: Sequence[str]) -> tuple[str, ...]:
    if patterns is None:
        return tuple(default)
    return (patterns,) if isinstance(patterns, str) else tuple(str(p) for p in patterns)


def matching(names: Sequence[str], patterns: Sequence[str]) -> list[str]:
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def partition(
    net: nn.Module,
    embedding: str | Sequence[str] | None = None,
    tracked: str | Sequence[str] | None = None,
    what: str = "network",
) -> tuple[list[str], list[str], list[str]]:
    """(W, head, held fixed): the names of the parameters matching `embedding` (globs, default
    `embedding.*`) and, of those, `tracked` (default all of them); the rest of the parameters are the head.
    Embedding parameters outside `tracked` are held fixed at their values."""
    # every parameter, whatever its requires_grad: training freezes W in case fixed, and that is not a choice of W
    names = [n for n, _ in net.named_parameters()]
    emb_globs = globs(embedding, DEFAULT_EMBEDDING)
    emb = matching(names, emb_globs)
    if not emb:
        raise MsifError(
            f"No parameter of the {what} ({type(net).__name__}) matches the embedding globs {list(emb_globs)}.",
            "Name the parameters shared by both stages (W) by globs over `named_parameters()`, e.g. "
            f"embedding='features.*' for a torchvision model; its first parameter names are {names[:4]}.",
        )
    W = emb if tracked is None else matching(emb, globs(tracked, ()))
    if not W:
        raise MsifError(
            f"No embedding parameter of the {what} matches the tracked globs {list(globs(tracked, ()))}.",
            f"Pick globs among the embedding's parameter names, e.g. {emb[-2:]}.",
        )
    head = [n for n in names if n not in set(emb)]
    if not head:
        raise MsifError(
            f"Every parameter of the {what} matches the embedding globs {list(emb_globs)}: it has no head.",
            "The head (U resp. Θ) is the parameters outside the embedding; narrow the embedding globs.",
        )
    return W, head, [n for n in emb if n not in set(W)]


def network_space(
    net: nn.Module, embedding: str | Sequence[str] | None = None, tracked: str | Sequence[str] | None = None
) -> tuple[ParamSpace, torch.Tensor]:
    """The flat space of a two-stage network (the tracked embedding W first, then the head) and its current point."""
    W, head, _ = partition(net, embedding, tracked)
    params = dict(net.named_parameters())
    space = ParamSpace({n: params[n].detach() for n in (*W, *head)}, n_embedding=len(W))
    return space, space.flatten({n: params[n].detach() for n in space.names})


def head_space(space: ParamSpace) -> ParamSpace:
    """The head block of `space` on its own (case fixed: W is frozen during finetuning)."""
    params = dict(zip(space.names, space.shapes, strict=True))
    return ParamSpace({n: torch.empty(params[n]) for n in space.names[len(space.embedding_names) :]})


def per_example_loss(
    net: nn.Module, space: ParamSpace, objective: Objective = cross_entropy, fixed: dict | None = None
) -> FlatLoss:
    """(flat, batch) -> the (b,) per-example losses with the parameters of `space` set to `flat` (and those of
    `fixed` to theirs; the network's own values for the rest)."""
    fixed = fixed or {}

    def loss(flat: torch.Tensor, batch) -> torch.Tensor:
        return objective(net, {**fixed, **space.unflatten(flat)}, batch)

    return loss


def summed_loss(
    net: nn.Module, space: ParamSpace, objective: Objective = cross_entropy, fixed: dict | None = None
) -> FlatLoss:
    """(flat, batch) -> Σ over the batch of the per-example losses (see `per_example_loss`)."""
    each = per_example_loss(net, space, objective, fixed)

    def loss(flat: torch.Tensor, batch) -> torch.Tensor:
        return each(flat, batch).sum()

    return loss


@torch.no_grad()
def embed(embedding: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Flattened embedding features of `x`, computed in batches."""
    return torch.cat([embedding(x[i : i + batch_size]).flatten(1) for i in range(0, len(x), batch_size)])
