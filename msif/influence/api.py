"""`MultiStageInfluence`: the Python API over the steps in multistage.py (the CLI stage is a thin layer on it).

    from msif.influence import MultiStageInfluence
    msi = MultiStageInfluence(pretrain_net, finetune_net, (x_pre, y_pre), (x_fin, y_fin), case="fixed")
    scores = msi.influence(x_test, y_test)              # (m,)  I(z, T) for T = all the given test points
    matrix = msi.influence(x_test, y_test, per_test=True)  # (m, |T|)  one column per test point

The networks follow the embedding/head contract of msif.models: modules with `.embedding` (parameters W) and
`.head` (U for the pretrain network, Θ for the finetune network), `forward(x) = head(embedding(x).flatten(1))`,
trained with mean cross-entropy. Data are (x, y) tensors or any iterable of (x, y) batches (e.g. a DataLoader).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from msif.errors import MsifError
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
from msif.influence.params import ParamSpace, embed, network_space, summed_loss
from msif.influence.scoring import METHODS as SCORE_METHODS
from msif.influence.scoring import score_network
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


def check_network(net: nn.Module, x: torch.Tensor, y: torch.Tensor, what: str, device, two_stage: bool = True) -> None:
    """The embedding/head contract (`two_stage`) and the labels, checked before any work: one paragraph saying what
    is expected."""
    missing = [n for n in ("embedding", "head") if two_stage and not isinstance(getattr(net, n, None), nn.Module)]
    if missing:
        raise MsifError(
            f"The {what} network ({type(net).__name__}) has no `.{missing[0]}` submodule.",
            "msif needs a module with `.embedding` (the parameters W shared by both stages) and `.head` (the task's "
            "own parameters) whose forward is head(embedding(x).flatten(1)); wrap a model that names them "
            "otherwise (e.g. a torchvision model's `features` / `classifier`) in such a module.",
        )
    if len(y) == 0:
        raise MsifError(f"The {what} data set is empty.", "Pass at least one (x, y) example.")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise MsifError(
            f"The {what} labels are {y.dtype}, not class indices.", "Pass integer labels 0..k−1 (torch.long)."
        )
    with torch.no_grad():
        k = int(net(x[:1].to(device)).shape[-1])
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= k:
        raise MsifError(
            f"The {what} labels run from {low} to {high}, but the network has {k} outputs.",
            f"Labels are class indices for cross-entropy: map them to 0..{k - 1}.",
        )


def as_tensors(data) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) from a pair of tensors, an object with .x/.y, or an iterable of (x, y) batches."""
    if hasattr(data, "x") and hasattr(data, "y"):
        return data.x, data.y
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return data[0], data[1]
    if isinstance(data, Iterable):
        xs, ys = zip(*[(b[0], b[1]) for b in data], strict=True)
        return torch.cat(xs), torch.cat(ys)
    raise MsifError(
        f"Cannot read examples from a {type(data).__name__}.",
        "Pass (x, y) tensors or an iterable of (x, y) batches such as a DataLoader.",
    )


def rows_of(x: torch.Tensor, y: torch.Tensor, indices) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows `indices` of (x, y); all of them *without a copy* when None, so that scoring streams batch by batch
    through x (which may be a memory-mapped tensor larger than memory) and holds one batch at a time."""
    if indices is None:
        return x, y
    idx = torch.as_tensor(indices)
    return x[idx], y[idx]


def _batches(x, y, idx, batch_size, device):
    return [
        (x[idx[i : i + batch_size]].to(device), y[idx[i : i + batch_size]].to(device))
        for i in range(0, len(idx), batch_size)
    ]


def _sample(n: int, k: int | None, seed: int) -> torch.Tensor:
    if k is None or k >= n:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[:k].sort().values


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
    ):
        """`solver`: one solver's settings per Hessian (`default_solver()`; typed `SolverSettings` or mappings).
        `graph_budget`: bytes the Hessians' kept gradient graphs may take (0: never keep them).
        `*_cache_dir`: where fitted curvature (the lowrank solver's Ritz pairs) of each Hessian is kept between
        runs (None: in memory only)."""
        if case not in CASES:
            raise MsifError(f"Unknown finetune case '{case}'.", "Use case='fixed' or case='updated'.")
        self.case, self.alpha = case, float(alpha)
        self.solver = both_solvers(solver)
        self.batch_size = batch_size
        self.score_method = check_score_method(score_method)  # msif.influence.scoring: auto | jvp | per_example
        self.device = torch.device(device) if device is not None else next(pretrain_net.parameters()).device
        self.pretrain_net = copy.deepcopy(pretrain_net).to(self.device).eval()
        self.finetune_net = copy.deepcopy(finetune_net).to(self.device).eval()
        self.x_pre, self.y_pre = as_tensors(pretrain_data)
        self.x_fin, self.y_fin = as_tensors(finetune_data)
        check_network(self.pretrain_net, self.x_pre, self.y_pre, "pretraining", self.device)
        check_network(self.finetune_net, self.x_fin, self.y_fin, "finetuning", self.device)
        self.m, self.n = len(self.y_pre), len(self.y_fin)

        # The pretrain side: G over a fixed random sample of pretraining examples (Appendix B: 1,000).
        self.pre_space, self.pre_point = network_space(self.pretrain_net)
        self.hessian_index = _sample(self.m, hessian_sample, sample_seed)
        self.H_G = Hessian(
            summed_loss(self.pretrain_net, self.pre_space),
            self.pre_point,
            _batches(self.x_pre, self.y_pre, self.hessian_index, batch_size, self.device),
            graph_budget=graph_budget,
            cache_dir=pretrain_cache_dir,
        )

        # The finetune side.
        self.fin_space, self.fin_point = network_space(self.finetune_net)
        self.W = self.fin_space.block("embedding.")
        fin_idx = _sample(self.n, finetune_hessian_sample, sample_seed)
        fin_batches = _batches(self.x_fin, self.y_fin, fin_idx, batch_size, self.device)
        f_loss = summed_loss(self.finetune_net, self.fin_space)
        if case == "fixed":
            pre_W = self.pre_point[self.pre_space.block("embedding.")]
            if not torch.allclose(pre_W, self.fin_point[self.W]):
                raise MsifError(
                    "case='fixed' but the finetuned network's embedding differs from the pretrained one.",
                    "In case fixed W stays at W*; use case='updated' for a finetuned embedding.",
                )
            # H_ΘΘ with W frozen: the features are computed once and the Hessian is over the head alone.
            head_params = {k: v.detach() for k, v in self.finetune_net.head.named_parameters()}
            head_space = ParamSpace(head_params)
            features = [(embed(self.finetune_net.embedding, x, batch_size), y) for x, y in fin_batches]
            self.H_F = Hessian(
                summed_loss(self.finetune_net.head, head_space),
                self.fin_point[self.W.stop :],
                features,
                graph_budget=graph_budget,
                cache_dir=finetune_cache_dir,
            )
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

    def parameter_counts(self) -> dict[str, int]:
        return {"W": self.W.stop, "U": self.pre_space.size - self.W.stop, "Theta": self.fin_space.size - self.W.stop}

    def target_vectors(self, x_T: torch.Tensor, y_T: torch.Tensor, per_test: bool = False) -> torch.Tensor:
        """The solved vectors s (K, |W| + |U|), one per target (K = 1 unless `per_test`)."""
        tr = self.trace
        x_T, y_T = x_T.to(self.device), y_T.to(self.device)
        with tr.timed("gradients"):
            V = target_gradient(
                summed_loss(self.finetune_net, self.fin_space), self.fin_point, x_T, y_T, per_test, self.batch_size
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
        x, y = rows_of(self.x_pre, self.y_pre, indices)
        with self.trace.timed("scoring"):
            return score_network(
                self.pretrain_net,
                self.pre_space,
                self.pre_point,
                S,
                x,
                y,
                self.batch_size,
                self.device,
                self.score_method,
                self.trace.scoring,
                "pretraining examples",
            )

    def influence(
        self, x_T: torch.Tensor, y_T: torch.Tensor, per_test: bool = False, indices: torch.Tensor | None = None
    ) -> torch.Tensor:
        """I(z, T) for every pretraining example z (or `indices`): (m,) for the summed target, (m, |T|) per test."""
        scores = self.score(self.target_vectors(x_T, y_T, per_test), indices)
        return scores if per_test else scores[:, 0]
