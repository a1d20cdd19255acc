"""pyDVL 0.10.0 (`pydvl.influence.torch`) on the shared peer-library problem, scores in msif's convention.

Every method returns I(z) = −∇L_Tᵀ (H + λI)⁻¹ ∇ℓ(z) (positive = harmful), float64, shape (m,); see problem.py.

Conventions of pyDVL 0.10.0, read from its source (influence_function_model.py, operator.py, batch_operation.py):

* Sign. `influences(..., mode=InfluenceMode.Up)` and `influences_from_factors` return
  +⟨(H + λI)⁻¹ ∇ℓ(test), ∇ℓ(z)⟩, with no minus sign. msif's score is the negative: I = −(pyDVL value).
* Scale. pyDVL's Hessian is that of the loss function it is given, averaged over the batches of the data loader:
  we pass `F.cross_entropy` (mean over a batch), so H is the Hessian of the MEAN loss, as in msif. But
  `HessianOperator` (CG, Arnoldi, Nyström) uses `ChunkAveraging`, an *unweighted* mean of the per-batch means, so
  the Hessian loader must have batches of equal size: we give it the whole Hessian sample as one batch (exact mean).
  Per-example gradients are gradients of the per-example CE (the loss applied to a batch of one), unscaled.
* Damping. `regularization=λ` adds λI to H (`(H + λI)x = b` in CG/LiSSA/Direct, `V(D + λ)⁻¹Vᵀ` in the low-rank
  methods), the same λ as msif: no conversion. It must be a Python float (an int or numpy scalar is taken for a
  per-block dict and rejected).
* One aggregated target. The summed test gradient g_T = Σ_t ∇ℓ(t) (pyDVL's own per-example gradients, summed) is
  passed as ONE right-hand side to the fitted model's inverse-Hessian operator (`block_mapper[...].op.apply`), and
  `influences_from_factors` scores the training examples against that one factor. This equals summing the rows of
  `influence_factors(x_test, y_test)` (linearity), with one solve instead of 500 (which matters for CG and LiSSA,
  where each row is a separate iterative solve).

Methods covered and why some are not (MNIST: 56,196 parameters, 1,000 Hessian examples, 500 test points):

* CG (`CgInfluence`): 10 and 50 iterations (msif's budgets). pyDVL starts CG at x₀ = b (not 0) and stops when the
  residual norm < max(rtol²·|b₀|, atol²) (with its defaults rtol 1e-4, atol 1e-6; b₀ is the first *coordinate* of
  the right-hand side, a quirk of `CgOperator._apply_to_mat`): a strict test (on the digits check, λ = 0.1, it
  stopped CG after 11 iterations; not checked whether it fires within 50 on MNIST). The max-iteration warning is
  turned off (the cap is deliberate).
* LiSSA (`LissaInfluence`): depth 200, minibatches of 250 of the Hessian sample (pyDVL draws a random batch per
  step from `DataLoader(shuffle=True)`; seeded with 0), dampen 0, and scale = 1.1 × the largest eigenvalue of
  H + λI estimated by 10 power iterations on pyDVL's `HessianOperator` (what msif's `scale: auto` does); pyDVL's
  default scale=10 is stable but, at λ = 0.01 and depth 200, leaves the small-curvature directions far from
  converged. Full-batch steps (one HVP over all 1,000 rows, ~2–3 s on 2 cores) would take ~8–10 min at depth 200.
* Arnoldi (`ArnoldiInfluence`): ARPACK (`scipy.sparse.linalg.eigsh`) for the top eigenpairs of H, then
  (H + λI)⁻¹ ≈ V (D + λ)⁻¹ Vᵀ (pyDVL's default `use_woodbury=False`: nothing outside the top-k subspace).
  Rank 30 (pyDVL's default Krylov dimension 2·rank+1 = 61, default tol 1e-6): rank 100 would take ~300 full-sample
  HVPs on MNIST, far past the ~5-minute budget. See ARNOLDI_RANK below.
* Nyström sketch (`NystroemSketchInfluence`): rank 50 (see NYSTROEM_RANK), random Gaussian sketch (seeded with
  0), inverse by Woodbury, (H_nys + λI)⁻¹ exactly, including the 1/λ on the complement of the sketch.
* Inverse harmonic mean (`InverseHarmonicMeanInfluence`): replaces (H + λI)⁻¹ by the mean over the Hessian sample
  of the inverses of the damped rank-one Gauss–Newton terms (∇ℓ∇ℓᵀ + λI)⁻¹ (Sherman–Morrison). A different
  curvature (empirical-Fisher based), included because it is one of pyDVL's IHVP methods; expect only loose
  agreement.
* Not run: `DirectInfluence` forms the dense 56k × 56k Hessian (12.6 GB in float32) – digits check only
  (`pydvl_direct` below). `EkfacInfluence` supports only `nn.Linear` layers (it raises
  `NotImplementedLayerRepresentationException` on the `Conv2d` layers of msif's networks); restricting it to the
  linear head would change θ, so it is left out.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from .problem import Problem

# MNIST budget (~5 min per method on 2 shared cores): one pyDVL HVP over the 1,000-row Hessian sample took 2–4 s
# there, and scoring the 24,754 training examples ~1–1.5 min. ARPACK needed ~3 × rank matvecs on digits (155 for
# rank 50, 305 for rank 100), so rank 100 (~15 min) and rank 50 (~7 min) were cut to rank 30 (Krylov 61).
ARNOLDI_RANK = 30
# Nyström applies H to all `rank` sketch vectors at once; rank 100 took 8 min on MNIST (2 shared cores), so rank 50.
NYSTROEM_RANK = 50

logging.getLogger("pydvl").setLevel(logging.ERROR)  # pyDVL logs max-iteration notes at WARNING/INFO


def _imports():
    with warnings.catch_warnings():  # pyDVL 0.10.0 triggers a pyDeprecate FutureWarning on import
        warnings.simplefilter("ignore", FutureWarning)
        import pydvl.influence.torch as pt
        from pydvl.influence.torch.base import TorchBatch
        from pydvl.influence.torch.operator import HessianOperator
    return pt, TorchBatch, HessianOperator


def _hessian_loader(p: Problem, batch_size: int | None = None, equal_batches: bool = True) -> DataLoader:
    n = len(p.hessian_index)
    bs = n if batch_size is None else min(batch_size, n)
    if equal_batches and n % bs:
        raise ValueError(f"batch size {bs} does not divide the Hessian sample ({n}); pyDVL averages batch means")
    return DataLoader(TensorDataset(p.x_hessian, p.y_hessian), batch_size=bs, shuffle=False)


def _target_gradient(p: Problem, flat_grads: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """g_T = Σ_t ∇ℓ(t), summed from pyDVL's own per-example gradients (so in its parameter order): (1, P)."""
    g = None
    for i in range(0, len(p.y_test), p.batch_size):
        gb = flat_grads(p.x_test[i : i + p.batch_size], p.y_test[i : i + p.batch_size]).sum(0)
        g = gb if g is None else g + gb
    return g.unsqueeze(0)


def _score(p: Problem, inf) -> np.ndarray:
    """Fitted pyDVL model -> msif scores for every training example, from ONE aggregated factor."""
    TorchBatch = _imports()[1]
    if hasattr(inf, "block_mapper"):  # composable models (all but EK-FAC): one block with BlockMode.FULL
        (comp,) = [c for _, c in inf.block_mapper.items()]  # its operator `op` and gradient provider `gp`
        g_T = _target_gradient(p, lambda x, y: comp.gp.flat_grads(TorchBatch(x, y)))
        factor = comp.op.apply(g_T)  # (H + λI)⁻¹ g_T, (1, P)
    else:  # EK-FAC (TorchInfluenceFunctionModel)
        factor = inf._solve_hvp(_target_gradient(p, inf._loss_grad))
    out = []
    for i in range(0, p.m, p.batch_size):
        v = inf.influences_from_factors(factor, p.x_train[i : i + p.batch_size], p.y_train[i : i + p.batch_size])
        out.append(v.reshape(-1).detach())
    return -torch.cat(out).double().numpy()  # pyDVL gives +g_Tᵀ(H+λI)⁻¹∇ℓ(z); msif's I is its negative


def _run(p: Problem, build: Callable[[torch.nn.Module], object], loader: DataLoader) -> np.ndarray:
    model = copy.deepcopy(p.net).eval()  # pyDVL keeps references to the parameters; never touch p.net
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(0)
        warnings.simplefilter("ignore", FutureWarning)
        inf = build(model).fit(loader)
        return _score(p, inf)


def pydvl_cg(iterations: int) -> Callable[[Problem], np.ndarray]:
    def method(p: Problem) -> np.ndarray:
        pt = _imports()[0]
        return _run(
            p,
            lambda m: pt.CgInfluence(
                m, F.cross_entropy, regularization=float(p.damping), maxiter=iterations, warn_on_max_iteration=False
            ),
            _hessian_loader(p),
        )

    return method


def _largest_eigenvalue(p: Problem, model: torch.nn.Module, iterations: int = 10) -> float:
    """Power iteration on pyDVL's HessianOperator (full Hessian sample) for the top eigenvalue of H + λI."""
    HessianOperator = _imports()[2]
    op = HessianOperator(model, F.cross_entropy, _hessian_loader(p))
    g = torch.Generator().manual_seed(0)
    v = torch.randn(op.input_size, generator=g)
    v /= v.norm()
    lam = 0.0
    for _ in range(iterations):
        w = op.apply(v.unsqueeze(0)).squeeze(0) + p.damping * v
        lam = float(w @ v)
        v = w / w.norm()
    return lam


def pydvl_lissa(depth: int, batch_size: int = 250) -> Callable[[Problem], np.ndarray]:
    def method(p: Problem) -> np.ndarray:
        pt = _imports()[0]
        scale = 1.1 * _largest_eigenvalue(p, copy.deepcopy(p.net).eval())
        return _run(
            p,
            lambda m: pt.LissaInfluence(
                m,
                F.cross_entropy,
                regularization=float(p.damping),
                maxiter=depth,
                scale=float(scale),
                dampen=0.0,
                warn_on_max_iteration=False,
            ),
            # each step draws the first batch of a fresh shuffle: one random batch of `batch_size` rows
            _hessian_loader(p, batch_size, equal_batches=False),
        )

    return method


def pydvl_arnoldi(rank: int, krylov_dimension: int | None = None, tol: float = 1e-6) -> Callable[[Problem], np.ndarray]:
    def method(p: Problem) -> np.ndarray:
        pt = _imports()[0]
        return _run(
            p,
            lambda m: pt.ArnoldiInfluence(
                m,
                F.cross_entropy,
                regularization=float(p.damping),
                rank=rank,
                krylov_dimension=krylov_dimension,
                tol=tol,
            ),
            _hessian_loader(p),
        )

    return method


def pydvl_nystroem(rank: int) -> Callable[[Problem], np.ndarray]:
    def method(p: Problem) -> np.ndarray:
        pt = _imports()[0]
        # the sketch applies H to all `rank` vectors at once (vmap): batch × rank ≤ 1000 keeps memory ~1 GB on MNIST
        # (the whole 1,000-row sample in one batch was killed for memory); equal batches, see _hessian_loader
        n = len(p.hessian_index)
        bs = max(d for d in range(1, n + 1) if n % d == 0 and d * rank <= 1000) if rank <= 1000 else 1
        return _run(
            p,
            lambda m: pt.NystroemSketchInfluence(m, F.cross_entropy, regularization=float(p.damping), rank=rank),
            _hessian_loader(p, bs),
        )

    return method


def pydvl_inverse_harmonic_mean(p: Problem) -> np.ndarray:
    pt = _imports()[0]
    return _run(
        p,
        lambda m: pt.InverseHarmonicMeanInfluence(m, F.cross_entropy, regularization=float(p.damping)),
        _hessian_loader(p, 100, equal_batches=False),  # PointAveraging (weighted by batch size): any batch size
    )


def pydvl_direct(p: Problem) -> np.ndarray:
    """Dense Hessian and torch.linalg.solve: small networks only (digits check), never on MNIST."""
    pt = _imports()[0]
    n = len(p.hessian_index)
    # hessian() weights batches by size, so any batch size is exact; small batches bound torch.func.hessian's memory
    return _run(
        p,
        lambda m: pt.DirectInfluence(m, F.cross_entropy, regularization=float(p.damping)),
        DataLoader(TensorDataset(p.x_hessian, p.y_hessian), batch_size=min(n, 10), shuffle=False),
    )


def pydvl_ekfac(p: Problem) -> np.ndarray:
    """EK-FAC with refitted diagonal; raises on msif's networks (Conv2d layers are not supported by pyDVL 0.10.0)."""
    pt = _imports()[0]
    return _run(
        p,
        lambda m: pt.EkfacInfluence(m, update_diagonal=True, hessian_regularization=float(p.damping)),
        _hessian_loader(p),
    )


METHODS: dict[str, Callable[[Problem], np.ndarray]] = {
    "pydvl cg (10 it)": pydvl_cg(10),
    "pydvl cg (50 it)": pydvl_cg(50),
    "pydvl lissa (depth 200, batch 250)": pydvl_lissa(200, 250),
    f"pydvl arnoldi (rank {ARNOLDI_RANK})": pydvl_arnoldi(ARNOLDI_RANK),
    f"pydvl nystroem (rank {NYSTROEM_RANK})": pydvl_nystroem(NYSTROEM_RANK),
    "pydvl inverse harmonic mean": pydvl_inverse_harmonic_mean,
}


if __name__ == "__main__":  # quick timing on the digits problem
    import sys

    from .problem import build_problem

    prob = build_problem(sys.argv[1] if len(sys.argv) > 1 else "digits")
    for label, fn in METHODS.items():
        t = time.perf_counter()
        s = fn(prob)
        print(f"{label:40s} {time.perf_counter() - t:8.1f}s  norm {np.linalg.norm(s):.4g}")
