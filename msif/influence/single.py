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

from msif.influence.api import _batches, _sample, as_tensors, check_network, check_score_method, rows_of
from msif.influence.hessian import GRAPH_BUDGET_BYTES, Hessian
from msif.influence.multistage import Trace, target_gradient
from msif.influence.params import network_space, summed_loss
from msif.influence.scoring import score_network
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
    ):
        """`solver`: the IHVP solver's settings (typed, or a mapping with `method`); `graph_budget`: bytes the
        Hessian's kept gradient graphs may take; `cache_dir`: where fitted curvature (lowrank) is kept."""
        self.solver = solver_settings(solver if solver is not None else DEFAULT_SOLVER, "pretrain")
        self.batch_size = batch_size
        self.score_method = check_score_method(score_method)  # msif.influence.scoring: auto | jvp | per_example
        self.device = torch.device(device) if device is not None else next(net.parameters()).device
        self.net = copy.deepcopy(net).to(self.device).eval()
        self.x, self.y = as_tensors(train_data)
        check_network(self.net, self.x, self.y, "training", self.device, two_stage=False)
        self.m = len(self.y)
        self.space, self.point = network_space(self.net)
        self.hessian_index = _sample(self.m, hessian_sample, sample_seed)
        self.H = Hessian(
            summed_loss(self.net, self.space),
            self.point,
            _batches(self.x, self.y, self.hessian_index, batch_size, self.device),
            graph_budget=graph_budget,
            cache_dir=cache_dir,
        )
        self.trace = Trace()

    def parameter_counts(self) -> dict[str, int]:
        return {"theta": self.space.size}

    def target_vectors(self, x_T: torch.Tensor, y_T: torch.Tensor, per_test: bool = False) -> torch.Tensor:
        """s = H⁻¹ ∇L_T, one row per target (K = 1 unless `per_test`)."""
        with self.trace.timed("gradients"):
            V = target_gradient(
                summed_loss(self.net, self.space),
                self.point,
                x_T.to(self.device),
                y_T.to(self.device),
                per_test,
                self.batch_size,
            )
        with self.trace.timed("ihvp"):
            S, report = solve(self.H, V, self.solver, "pretrain")
            self.trace.solves.append(report)
        return S

    def score(self, S: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        """I(z, T) = −⟨s, ∇ℓ(z)⟩ for the training examples `indices` (all when None): (len, K)."""
        x, y = rows_of(self.x, self.y, indices)
        with self.trace.timed("scoring"):
            return score_network(
                self.net,
                self.space,
                self.point,
                S,
                x,
                y,
                self.batch_size,
                self.device,
                self.score_method,
                self.trace.scoring,
                "training examples",
            )

    def influence(
        self, x_T: torch.Tensor, y_T: torch.Tensor, per_test: bool = False, indices: torch.Tensor | None = None
    ) -> torch.Tensor:
        """I(z, T) for every training example z (or `indices`): (m,) for the summed target, (m, |T|) per test."""
        scores = self.score(self.target_vectors(x_T, y_T, per_test), indices)
        return scores if per_test else scores[:, 0]
