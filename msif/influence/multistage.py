"""The multi-stage influence function, step by step as in docs/MATH.md (paper eq. 6–15, Algorithm 1).

Both cases end in one vector per target, s = H_G⁻¹ [· ; 0] in the pretrain parameter space (W, U), after which
every pretraining example z is scored by I(z, T) = −⟨s, ∇_{(W,U)} g(z)⟩ (scoring.py). Positive I: upweighting z
raises the target loss L_T (a harmful example); removing z changes L_T by about −I(z, T) / m.

Case fixed (W frozen during finetuning), at (W*, Θ*) and (W*, U*):
    1. v_Θ = ∇_Θ L_T, v_W = ∇_W L_T                          `target_gradient`
    2. a = H_ΘΘ⁻¹ v_Θ,  H_ΘΘ = ∇²_Θ F                          `ihvp1`
    3. u = v_W − (∂²F/∂Θ∂W)ᵀ a = v_W − [H_F [0 ; a]]_W        `mixed_term`
    4. s = H_G⁻¹ [u ; 0],  H_G = ∇²_{(W,U)} G                 `ihvp2`
Case updated (W finetuned too; proximal model α‖W − W̄‖², eq. 12), at (W**, Θ*) and (W̄, Ū):
    1. v = ∇_{(W,Θ)} L_T                                       `target_gradient`
    2. a = (H_F + 2α P_W)⁻¹ v                                  `ihvp1`
    3. s = H_G⁻¹ [2α a_W ; 0]                                  `ihvp2`
With the retrain response (docs/MATH.md, "The retrain response"), each inverse becomes the response f(H) of the
leave-one-out retrain's K gradient steps, and in case updated step 3 becomes s = f(H_G) [u ; 0] with
u = v_W − [H_F a]_W (`kept_shift`): the finetune retrain starts from W** moved by the pretraining change and, in K_f
steps, pulls back only part of it. As K → ∞ with the exact inverse, u = 2α a_W again.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch.func import grad, vmap

from msif import distributed
from msif.influence.batches import per_example
from msif.influence.hessian import Hessian
from msif.influence.params import FlatLoss, ParamSpace
from msif.influence.solvers import SolveReport, solve


@dataclass
class Trace:
    """Timings (seconds per step) and solver reports of one computation of s."""

    seconds: dict[str, float] = field(default_factory=dict)
    reused_seconds: dict[str, float] = field(default_factory=dict)  # an earlier run's, on the parts reused
    solves: list[SolveReport] = field(default_factory=list)
    scoring: dict = field(default_factory=dict)  # how the examples were scored (method, measured seconds)

    def timed(self, step: str):
        trace = self

        class _Timer:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                trace.seconds[step] = trace.seconds.get(step, 0.0) + time.perf_counter() - self.start

        return _Timer()


def target_gradient(loss: FlatLoss, point: torch.Tensor, batches: Iterable, per_test: bool) -> torch.Tensor:
    """Step 1: ∇ L_T at `point`, L_T = Σ_{t∈T} f(t) over the test `batches` (msif.influence.batches). One row
    (1, p), or one row per test point (|T|, p)."""
    batches = list(batches)
    if per_test:
        rows = [vmap(grad(loss), in_dims=(None, 0))(point, per_example(b)) for b in batches]
        return torch.cat(rows)
    # under torchrun each process sums its share of T, then all-reduce; one process sums the batch rows as before
    rows = [grad(loss)(point, b) for b in distributed.shard(batches)]
    total = torch.stack(rows).sum(0, keepdim=True) if rows else torch.zeros(1, point.numel(), dtype=point.dtype)
    return distributed.all_reduce_sum(total.to(point.device))


def ihvp1(H_F: Hessian, V: torch.Tensor, settings) -> tuple[torch.Tensor, SolveReport]:
    """Step 2: the finetune IHVP (H_ΘΘ⁻¹ v_Θ in case fixed, (H_F + 2αP_W)⁻¹ v in case updated)."""
    return solve(H_F, V, settings, "finetune")


def mixed_term(H_F_full: Hessian, finetune_space: ParamSpace, A: torch.Tensor) -> torch.Tensor:
    """Step 3 (case fixed): (∂²F/∂Θ∂W)ᵀ a = the W block of H_F [0 ; a], one HVP of the full finetune Hessian."""
    W = finetune_space.W
    padded = torch.zeros(len(A), finetune_space.size, dtype=A.dtype, device=A.device)
    padded[:, W.stop :] = A
    out = H_F_full.matvec(padded, once=True)[:, W]
    H_F_full.release()
    return out


def kept_shift(H_F: Hessian, V_W: torch.Tensor, A: torch.Tensor, W: slice, alpha: float) -> torch.Tensor:
    """Step 3 (case updated, retrain response): u = v_W − [H_F a]_W with H_F the finetune loss's own Hessian (the
    proximal 2α P_W that `H_F` carries as a shift taken off again), one HVP per target."""
    out = V_W - H_F.matvec(A, once=True)[:, W] + 2 * alpha * A[:, W]
    H_F.release()
    return out


def pad_to_pretrain_space(vec_W: torch.Tensor, pretrain_space: ParamSpace) -> torch.Tensor:
    """[w ; 0]: a W-block vector extended by zeros over the pretrain head U."""
    out = torch.zeros(len(vec_W), pretrain_space.size, dtype=vec_W.dtype, device=vec_W.device)
    out[:, pretrain_space.W] = vec_W
    return out


def ihvp2(H_G: Hessian, rhs: torch.Tensor, settings) -> tuple[torch.Tensor, SolveReport]:
    """Step 4: s = H_G⁻¹ [· ; 0], the pretrain IHVP."""
    return solve(H_G, rhs, settings, "pretrain")
