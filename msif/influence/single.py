"""Classic single-stage influence (Koh & Liang, 2017): training examples of one model on a test loss of that model.

    from msif.influence import SingleStageInfluence
    ssi = SingleStageInfluence(net, (x_train, y_train), solver=default_solver()["pretrain"])
    scores = ssi.influence(x_test, y_test)      # (m,)  I(z, T) = −⟨H⁻¹ ∇L_T, ∇ℓ(z)⟩

H is the Hessian of the mean training loss (on a fixed sample of `hessian_sample` examples), L_T = Σ_{t∈T} ℓ(t), and
the sign and units are those of the multi-stage score (docs/MATH.md): I = dL_T/dε for upweighting z by ε, positive I is
harmful, removing z changes L_T by about −I/m. It is the multi-stage score with no second stage, the part every
influence library computes; `msif influence mode=single_stage` runs it on the pretrained network.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from msif.influence.api import (
    _sample,
    check_network,
    check_score_method,
    checked,
    hessian_batches,
    scored_rows,
    target_examples,
)
from msif.influence.batches import Examples, to_device
from msif.influence.hessian import GRAPH_BUDGET_BYTES, Hessian
from msif.influence.multistage import Trace, target_gradient
from msif.influence.params import Objective, ParamSpace, cross_entropy, summed_loss
from msif.influence.scoring import score_network, score_solved
from msif.influence.settings import SolverSettings, solver_settings
from msif.influence.solvers import solve

# the solver used when none is given: the paper's (H² + λI)⁻¹H by Lanczos (fine for an indefinite H), until the
# answer changes by less than 1e-6 relative (MNIST: 26 HVPs; benchmarks/peers.py, see the README's benchmark table)
DEFAULT_SOLVER = {"method": "lanczos", "damping": 1e-2, "iterations": 100, "tol": 1e-6}


class SingleStageInfluence:
    """Influence of the training examples of `net` on its own test loss L_T (every parameter of `net`)."""

    def __init__(
        self,
        net: nn.Module,
        train_data,
        *,
        solver: SolverSettings | dict | None = None,
        hessian_sample: int | None = 1000,
        sample_seed: int = 0,
        batch_size: int = 256,
        device: str | torch.device | None = None,
        score_method: str = "auto",
        graph_budget: int = GRAPH_BUDGET_BYTES,
        cache_dir: str | Path | None = None,
        loss: Objective | None = None,
    ):
        """`solver`: the IHVP solver's settings (typed, or a mapping with `method`); `graph_budget`: bytes the
        Hessian's kept gradient graphs may take; `cache_dir`: where fitted curvature (lowrank) is kept; `loss`: the
        per-example loss (msif.influence.params.Objective; default cross-entropy on (x, y) batches). Data: anything
        msif.influence.batches.Examples reads (tensors, Datasets, DataLoaders, iterables of batches)."""
        self.solver = solver_settings(solver if solver is not None else DEFAULT_SOLVER, "pretrain")
        self.batch_size = batch_size
        self.score_method = check_score_method(score_method)  # msif.influence.scoring: auto | jvp | per_example
        self.device = torch.device(device) if device is not None else next(net.parameters()).device
        self.net = copy.deepcopy(net).to(self.device).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)  # every derivative is taken of the flat vector
        self.loss = loss or cross_entropy
        self.data = Examples(train_data, "training examples")
        check_network(self.net, self.data, "training", self.device, loss)
        self.m = len(self.data)
        params = {n: p.detach() for n, p in self.net.named_parameters()}
        self.space = ParamSpace(params)
        self.point = self.space.flatten(params)
        self.hessian_index = _sample(self.m, hessian_sample, sample_seed)
        self.H = Hessian(
            summed_loss(self.net, self.space, self.loss),
            self.point,
            hessian_batches(self.data, self.hessian_index, batch_size, self.device, self.net, self.loss, "training"),
            graph_budget=graph_budget,
            cache_dir=cache_dir,
        )
        self.trace = Trace()

    def parameter_counts(self) -> dict[str, int]:
        return {"theta": self.space.size}

    def target_vectors(self, x_T, y_T=None, per_test: bool = False) -> torch.Tensor:
        """s = H⁻¹ ∇L_T, one row per target (K = 1 unless `per_test`); (x_T, y_T) tensors or test data as x_T."""
        batches = [to_device(b, self.device) for b in target_examples(x_T, y_T).batches(self.batch_size)]
        with self.trace.timed("gradients"):
            V = target_gradient(summed_loss(self.net, self.space, self.loss), self.point, batches, per_test)
        with self.trace.timed("ihvp"):
            S, report = solve(self.H, V, self.solver, "pretrain")
            self.trace.solves.append(report)
        return S

    def score(self, S: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        """I(z, T) = −⟨s, ∇ℓ(z)⟩ for the training examples `indices` (all when None): (len, K)."""
        rows, count = scored_rows(self.data, indices)
        with self.trace.timed("scoring"):
            return score_network(
                self.net,
                self.space,
                self.point,
                S,
                checked(self.data.batches(self.batch_size, rows), self.net, self.loss, "training"),
                count,
                self.device,
                self.score_method,
                self.trace.scoring,
                "training examples",
                self.loss,
            )

    def influence(self, x_T, y_T=None, per_test: bool = False, indices: torch.Tensor | None = None) -> torch.Tensor:
        """I(z, T) for every training example z (or `indices`): (m,) for the summed target, (m, |T|) per test.
        When the solver answered with fewer basis vectors than targets (`lowrank`: X = C U), the examples are
        scored against the basis and the scores combined by C: the same numbers up to rounding, fewer passes."""
        S = self.target_vectors(x_T, y_T, per_test)
        scores = score_solved(self.score, S, self.trace.solves[-1], indices)
        return scores if per_test else scores[:, 0]
