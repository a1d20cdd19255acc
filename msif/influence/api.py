"""`MultiStageInfluence`: the Python API over the steps in multistage.py (the CLI stage is a thin layer on it).

    from msif.influence import MultiStageInfluence
    msi = MultiStageInfluence(pretrain_net, finetune_net, (x_pre, y_pre), (x_fin, y_fin), case="fixed")
    scores = msi.influence(x_test, y_test)              # (m,)  I(z, T) for T = all the given test points
    matrix = msi.influence(x_test, y_test, per_test=True)  # (m, |T|)  one column per test point

The parameters shared by both networks (the embedding W) are named by globs, `embedding="embedding.*"` by default
(msif.models' `.embedding` / `.head` contract; `embedding="features.*"` for a torchvision-style model); every other
parameter is the network's head (U for the pretrain network, Θ for the finetune network). `embedding_params` tracks
only part of W (e.g. the last block of a large backbone) and holds the rest fixed: an approximation.

Data are (x, y) tensors, map-style Datasets, DataLoaders or iterables of batches (msif.influence.batches), read batch
by batch; batches may be dicts. The losses default to mean cross-entropy of `net(x)` on (x, y) batches; any other is
an `Objective` (msif.influence.params): `(net, params, batch) -> per-example losses`, e.g. a language model's:

    def lm_loss(net, params, batch):
        logits = torch.func.functional_call(net, params, (batch["tokens"][:, :-1],))
        each = F.cross_entropy(logits.transpose(1, 2), batch["tokens"][:, 1:], reduction="none")
        return each.mean(1)
    msi = MultiStageInfluence(lm, classifier, corpus_loader, reviews_loader, pretrain_loss=lm_loss)
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from msif.errors import MsifError
from msif.influence.batches import Examples, batch_size, take, to_device
from msif.influence.hessian import GRAPH_BUDGET_BYTES, Hessian
from msif.influence.multistage import (
    Trace,
    ihvp1,
    ihvp2,
    kept_shift,
    mixed_term,
    pad_to_pretrain_space,
    target_gradient,
)
from msif.influence.params import (
    DEFAULT_EMBEDDING,
    IGNORE,
    Objective,
    ParamSpace,
    cross_entropy,
    embed,
    globs,
    head_space,
    network_space,
    partition,
    summed_loss,
)
from msif.influence.scoring import METHODS as SCORE_METHODS
from msif.influence.scoring import score_network, score_solved
from msif.influence.settings import SETTINGS, SolverSettings, solver_settings

CASES = ("fixed", "updated")


def default_solver(
    method: str = "lanczos",
    pretrain_damping: float = 1e-2,
    finetune_damping: float = 1e-8,
    iterations: int = 100,
    tol: float = 1e-6,
    **extra: Any,
) -> dict[str, dict[str, Any]]:
    """Solver settings for both Hessians (the shape of the `solver` config group); `iterations` goes to the methods
    that iterate (lanczos, cg_normal, cg)."""
    common = {"method": method, "tol": tol, **extra}
    if method in SETTINGS and "iterations" in {f.name for f in fields(SETTINGS[method])}:
        common["iterations"] = iterations
    return {"pretrain": {**common, "damping": pretrain_damping}, "finetune": {**common, "damping": finetune_damping}}


def both_solvers(solver: Mapping[str, Any] | None) -> dict[str, SolverSettings]:
    """{"pretrain": ..., "finetune": ...} typed and validated (msif.influence.settings); `default_solver()` if None."""
    solver = default_solver() if solver is None else solver
    if not isinstance(solver, Mapping) or set(solver) != {"pretrain", "finetune"}:
        raise MsifError(
            "solver must be a mapping with the keys 'pretrain' and 'finetune' (one solver per Hessian).",
            "Build it with msif.influence.default_solver(...), or pass {'pretrain': ..., 'finetune': ...}.",
        )
    return {side: solver_settings(solver[side], side) for side in ("pretrain", "finetune")}


def check_score_method(method: str) -> str:
    if method not in SCORE_METHODS:
        raise MsifError(f"Unknown score method '{method}'.", f"Use one of {list(SCORE_METHODS)}.")
    return method


log = logging.getLogger("msif")


def check_network(net: nn.Module, data: Examples, what: str, device, objective: Objective | None = None) -> None:
    """The loss works on the data, and (for the default cross-entropy) the labels are class indices the network has
    outputs for, checked before any work: one paragraph saying what is expected."""
    if len(data) == 0:
        raise MsifError(f"The {what} data set is empty.", "Pass at least one example.")
    first = to_device(data.first(2), device)
    if objective is None:
        y = data.pair[1] if data.pair is not None else first[1]
        _check_labels(net, first[0], y, what)
        return
    try:
        with torch.no_grad():
            losses = objective(net, dict(net.named_parameters()), first)
    except Exception as err:  # the user's loss on the user's batch: say which, with its own message
        raise MsifError(
            f"The {what} loss failed on the first batch of the data: {type(err).__name__}: {err}",
            "The loss is called as loss(net, params, batch) with a batch as the data yield it, and must return the "
            "per-example losses (a tensor of shape (b,)).",
        ) from err
    n = batch_size(first)
    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (n,):
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise MsifError(
            f"The {what} loss returned {shape} for a batch of {n} examples, not one loss per example.",
            f"Return the per-example losses, shape ({n},) (e.g. reduction='none', then a mean over tokens).",
        )


def _check_labels(net: nn.Module, x, y, what: str) -> None:
    if not isinstance(y, torch.Tensor) or y.dtype.is_floating_point or y.dtype == torch.bool:
        kind = y.dtype if isinstance(y, torch.Tensor) else type(y).__name__
        raise MsifError(
            f"The {what} labels are {kind}, not class indices.",
            "Pass integer labels 0..k−1 (torch.long), or a loss of your own (pretrain_loss= / finetune_loss=).",
        )
    with torch.no_grad():
        k = int(net(x[:1]).shape[-1])
    y = y[y != IGNORE]  # a sequence's positions without a target (a language model's padding)
    if len(y) == 0:
        return
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= k:
        raise MsifError(
            f"The {what} labels run from {low} to {high}, but the network has {k} outputs.",
            f"Labels are class indices for cross-entropy: map them to 0..{k - 1}.",
        )


def hessian_batches(data: Examples, rows: torch.Tensor, size: int, device, net: nn.Module, objective, what) -> list:
    """The Hessian sample's batches, on the device (held for the whole computation)."""
    return [to_device(b, device) for b in checked(data.batches(size, rows), net, objective, what)]


def _sample(n: int, k: int | None, seed: int) -> torch.Tensor:
    if k is None or k >= n:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[:k].sort().values


def target_examples(x_T, y_T) -> Examples:
    """The target's examples: (x_T, y_T) tensors, or any data `Examples` reads passed as x_T alone."""
    return Examples((x_T, y_T) if y_T is not None else x_T, "test examples")


def scored_rows(data: Examples, indices) -> tuple[torch.Tensor | None, int]:
    """(rows, how many) to score: all (None: streamed in order, without a copy) or the given indices."""
    if indices is None:
        return None, len(data)
    rows = torch.as_tensor(indices)
    return rows, len(rows)


class MultiStageInfluence:
    """Influence of pretraining examples on a finetuned model's test loss (Chen et al. 2020; docs/MATH.md)."""

    def __init__(
        self,
        pretrain_net: nn.Module,
        finetune_net: nn.Module,
        pretrain_data,
        finetune_data,
        *,
        case: str = "fixed",
        alpha: float = 0.01,
        solver: dict | None = None,
        hessian_sample: int | None = 1000,
        finetune_hessian_sample: int | None = None,
        sample_seed: int = 0,
        batch_size: int = 256,
        device: str | torch.device | None = None,
        score_method: str = "auto",
        graph_budget: int = GRAPH_BUDGET_BYTES,
        pretrain_cache_dir: str | Path | None = None,
        finetune_cache_dir: str | Path | None = None,
        embedding: str | Sequence[str] | None = None,
        embedding_params: str | Sequence[str] | None = None,
        pretrain_loss: Objective | None = None,
        finetune_loss: Objective | None = None,
    ):
        """`solver`: one solver's settings per Hessian (`default_solver()`; typed `SolverSettings` or mappings).
        `graph_budget`: bytes the Hessians' kept gradient graphs may take (0: never keep them).
        `*_cache_dir`: where fitted curvature (the lowrank solver's Ritz pairs) of each Hessian is kept between
        runs (None: in memory only). `embedding`: globs naming W in both networks (default `embedding.*`);
        `embedding_params`: the part of W to track (globs; default all), the rest held fixed — an approximation.
        `pretrain_loss` / `finetune_loss`: per-example losses (`Objective`; default cross-entropy on (x, y)); the
        finetune loss is also the test loss L_T."""
        if case not in CASES:
            raise MsifError(f"Unknown finetune case '{case}'.", "Use case='fixed' or case='updated'.")
        self.case, self.alpha = case, float(alpha)
        self.solver = both_solvers(solver)
        self.batch_size = batch_size
        self.score_method = check_score_method(score_method)  # msif.influence.scoring: auto | jvp | per_example
        self.device = torch.device(device) if device is not None else next(pretrain_net.parameters()).device
        self.pretrain_net = copy.deepcopy(pretrain_net).to(self.device).eval()
        self.finetune_net = copy.deepcopy(finetune_net).to(self.device).eval()
        for p in (*self.pretrain_net.parameters(), *self.finetune_net.parameters()):
            p.requires_grad_(False)  # every derivative is taken of flat vectors; held-fixed parameters stay constants
        self.pretrain_loss = pretrain_loss or cross_entropy
        self.finetune_loss = finetune_loss or cross_entropy
        self.pre_data = Examples(pretrain_data, "pretraining examples")
        self.fin_data = Examples(finetune_data, "finetuning examples")
        check_network(self.pretrain_net, self.pre_data, "pretraining", self.device, pretrain_loss)
        check_network(self.finetune_net, self.fin_data, "finetuning", self.device, finetune_loss)
        self.m, self.n = len(self.pre_data), len(self.fin_data)

        # Which parameters are W (tracked), the heads, and the embedding parameters held fixed.
        W_pre, _, fixed = partition(self.pretrain_net, embedding, embedding_params, "pretrain network")
        W_fin, _, _ = partition(self.finetune_net, embedding, embedding_params, "finetune network")
        shapes_pre = {n: tuple(p.shape) for n, p in self.pretrain_net.named_parameters()}
        shapes_fin = {n: tuple(p.shape) for n, p in self.finetune_net.named_parameters()}
        if W_pre != W_fin or any(shapes_pre[n] != shapes_fin[n] for n in W_pre):
            raise MsifError(
                f"The two networks' embeddings differ: the pretrain network's W is {len(W_pre)} parameter tensors, "
                f"the finetune network's {len(W_fin)}, or their shapes differ "
                f"(first names: {W_pre[:3]} vs {W_fin[:3]}).",
                "Both stages share the embedding W: pass networks whose embedding parameters have the same names "
                "and shapes (the finetune network is the pretrained embedding with a new head).",
            )
        self.held_fixed = fixed
        if fixed:
            log.info(
                "influence tracks %d of the embedding's parameter tensors; %d are held fixed", len(W_pre), len(fixed)
            )

        # The pretrain side: G over a fixed random sample of pretraining examples (Appendix B: 1,000).
        self.pre_space, self.pre_point = network_space(self.pretrain_net, embedding, embedding_params)
        self.hessian_index = _sample(self.m, hessian_sample, sample_seed)
        self.H_G = Hessian(
            summed_loss(self.pretrain_net, self.pre_space, self.pretrain_loss),
            self.pre_point,
            hessian_batches(
                self.pre_data,
                self.hessian_index,
                batch_size,
                self.device,
                self.pretrain_net,
                self.pretrain_loss,
                "pretraining",
            ),
            graph_budget=graph_budget,
            cache_dir=pretrain_cache_dir,
        )

        # The finetune side.
        self.fin_space, self.fin_point = network_space(self.finetune_net, embedding, embedding_params)
        self.W = self.fin_space.W
        fin_idx = _sample(self.n, finetune_hessian_sample, sample_seed)
        fin_batches = hessian_batches(
            self.fin_data, fin_idx, batch_size, self.device, self.finetune_net, self.finetune_loss, "finetuning"
        )
        f_loss = summed_loss(self.finetune_net, self.fin_space, self.finetune_loss)
        if case == "fixed":
            if not torch.allclose(self.pre_point[self.pre_space.W], self.fin_point[self.W]):
                raise MsifError(
                    "case='fixed' but the finetuned network's embedding differs from the pretrained one.",
                    "In case fixed W stays at W*; use case='updated' for a finetuned embedding.",
                )
            # H_ΘΘ with W frozen: over the head alone. With msif's own contract (.embedding / .head, cross-entropy)
            # the features are computed once; otherwise each product runs the whole network with W at W*.
            loss, theta, batches = self._head_problem(fin_batches, embedding, batch_size)
            self.H_F = Hessian(loss, theta, batches, graph_budget=graph_budget, cache_dir=finetune_cache_dir)
            self.H_F_full = Hessian(f_loss, self.fin_point, fin_batches, graph_budget=graph_budget)
        else:
            shift = torch.zeros_like(self.fin_point)
            shift[self.W] = 2 * self.alpha  # + 2α P_W: the proximal term's Hessian
            self.H_F = Hessian(
                f_loss,
                self.fin_point,
                fin_batches,
                shift=shift,
                graph_budget=graph_budget,
                cache_dir=finetune_cache_dir,
            )
        self.trace = Trace()

    def _head_problem(self, fin_batches: list, embedding, batch_size: int):
        """(loss over Θ, Θ*, batches) of the case-fixed finetune Hessian H_ΘΘ."""
        net, theta = self.finetune_net, self.fin_point[self.W.stop :]
        heads = head_space(self.fin_space)
        contract = (
            self.finetune_loss is cross_entropy
            and globs(embedding, DEFAULT_EMBEDDING) == DEFAULT_EMBEDDING
            and not self.held_fixed
            and isinstance(getattr(net, "embedding", None), nn.Module)
            and isinstance(getattr(net, "head", None), nn.Module)
            and all(n.startswith("head.") for n in heads.names)
        )
        if contract:
            local = ParamSpace(
                {n.removeprefix("head."): torch.empty(s) for n, s in zip(heads.names, heads.shapes, strict=True)}
            )
            features = [(embed(net.embedding, x, batch_size), y) for x, y in fin_batches]
            return summed_loss(net.head, local), theta, features
        return summed_loss(net, heads, self.finetune_loss), theta, fin_batches

    def parameter_counts(self) -> dict[str, int]:
        return {"W": self.W.stop, "U": self.pre_space.size - self.W.stop, "Theta": self.fin_space.size - self.W.stop}

    def target_vectors(self, x_T, y_T=None, per_test: bool = False) -> torch.Tensor:
        """The solved vectors s (K, |W| + |U|), one per target (K = 1 unless `per_test`). The target is
        (x_T, y_T) tensors, or any test data (batches the finetune loss reads) passed as x_T alone."""
        tr = self.trace
        test = target_examples(x_T, y_T)
        batches = [to_device(b, self.device) for b in test.batches(self.batch_size)]
        with tr.timed("gradients"):
            V = target_gradient(
                summed_loss(self.finetune_net, self.fin_space, self.finetune_loss), self.fin_point, batches, per_test
            )
        if self.case == "fixed":
            with tr.timed("ihvp1"):
                A, rep = ihvp1(self.H_F, V[:, self.W.stop :], self.solver["finetune"])
                tr.solves.append(rep)
            with tr.timed("mixed_term"):
                u = V[:, self.W] - mixed_term(self.H_F_full, self.fin_space, A)
            rhs = pad_to_pretrain_space(u, self.pre_space)
        else:
            with tr.timed("ihvp1"):
                A, rep = ihvp1(self.H_F, V, self.solver["finetune"])
                tr.solves.append(rep)
            if self.solver["finetune"].retrain is None:
                tr.seconds.setdefault("mixed_term", 0.0)  # no mixed term in case updated
                rhs = pad_to_pretrain_space(2 * self.alpha * A[:, self.W], self.pre_space)
            else:  # the retrain response: what the shifted start keeps after K_f steps
                with tr.timed("mixed_term"):
                    u = kept_shift(self.H_F, V[:, self.W], A, self.W, self.alpha)
                rhs = pad_to_pretrain_space(u, self.pre_space)
        with tr.timed("ihvp2"):
            S, rep = ihvp2(self.H_G, rhs, self.solver["pretrain"])
            tr.solves.append(rep)
        return S

    def score(self, S: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        """I(z, T) = −⟨s, ∇g(z)⟩ for the pretraining examples `indices` (all when None): (len, K)."""
        rows, count = scored_rows(self.pre_data, indices)
        with self.trace.timed("scoring"):
            return score_network(
                self.pretrain_net,
                self.pre_space,
                self.pre_point,
                S,
                checked(
                    self.pre_data.batches(self.batch_size, rows), self.pretrain_net, self.pretrain_loss, "pretraining"
                ),
                count,
                self.device,
                self.score_method,
                self.trace.scoring,
                "pretraining examples",
                self.pretrain_loss,
            )

    def influence(self, x_T, y_T=None, per_test: bool = False, indices: torch.Tensor | None = None) -> torch.Tensor:
        """I(z, T) for every pretraining example z (or `indices`): (m,) for the summed target, (m, |T|) per test.
        The target is (x_T, y_T) tensors, or any test data passed as x_T alone. When the pretrain solve answered
        with fewer basis vectors than targets (`lowrank`: s = C U), the examples are scored against the basis and
        the scores combined by C: the same numbers up to rounding, fewer passes."""
        S = self.target_vectors(x_T, y_T, per_test)
        scores = score_solved(self.score, S, self.trace.solves[-1], indices)
        return scores if per_test else scores[:, 0]


def checked(batches, net: nn.Module, objective: Objective, what: str):
    """The batches, with the labels of each checked on the way when the loss is the default cross-entropy (a label
    out of range would otherwise surface as an IndexError deep inside the scoring pass)."""
    k = None
    for b in batches:
        if objective is cross_entropy and isinstance(b, (tuple, list)):
            y = b[1][b[1] != IGNORE]
            if k is None:
                x1 = take(b, slice(0, 1))[0].to(next(net.parameters()).device)
                with torch.no_grad():
                    k = int(net(x1).shape[-1])
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= k):
                raise MsifError(
                    f"A batch of the {what} data has labels from {int(y.min())} to {int(y.max())}, but the network "
                    f"has {k} outputs.",
                    f"Labels are class indices for cross-entropy: map them to 0..{k - 1}.",
                )
        yield b
