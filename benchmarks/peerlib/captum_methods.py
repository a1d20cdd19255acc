"""captum 0.9.0 (`captum.influence`) on the shared peer-library problem, scores in msif's convention.

Every method returns I(z) = −∇L_Tᵀ (H + λI)⁻¹ ∇ℓ(z) (positive = harmful), float64, shape (m,); see problem.py.

Conventions of captum 0.9.0, read from its source (influence/_core/arnoldi_influence_function.py,
influence_function.py, influence/_utils/common.py):

* Sign. captum's influence score is +∇ℓ(test)ᵀ R Rᵀ ∇ℓ(z) with R Rᵀ ≈ H_c⁻¹ (no minus sign): msif's I is its
  negative.
* Scale. captum's Hessian H_c is the Hessian of the loss SUMMED over `hessian_dataset` (each batch's loss is summed –
  a 'mean' loss is multiplied back by the batch size – and the batches are added), i.e. H_c = n_h · H with n_h the
  Hessian-sample size and H msif's Hessian of the mean loss.
* Damping. `hessian_reg` r is added to H_c (to the Krylov restriction of H_c for Arnoldi, to the dense H_c for
  Naive) before the eigen-decomposition, so captum inverts (H_c + rI) = n_h (H + (r/n_h) I). We pass r = n_h·λ, so
  captum's score is ∇ℓ(test)ᵀ (H + λI)⁻¹ ∇ℓ(z) / n_h, and I = −n_h · (captum score).
* Low rank. Both classes keep only the top `projection_dim` eigenpairs of H_c + rI (those above
  `hessian_inverse_tol`) and use V diag(1/l) Vᵀ: no term for the complement of that subspace.
* One aggregated target. `compute_intermediate_quantities(test batch, aggregate=True, test=True)` returns the SUM of
  the test examples' influence embeddings ∇ℓ(t)ᵀR, i.e. (∇L_T)ᵀR for the summed target (captum documents this use:
  "the influence of a given training example on the total loss over a validation dataset"); the training
  embeddings ∇ℓ(z)ᵀR are dotted with it.
* Loss and gradients: `nn.CrossEntropyLoss(reduction="sum")` with `sample_wise_grads_per_batch=True` (captum's
  hook-based per-example gradients, supported for Conv2d and Linear – the only parameterised layers of msif's
  networks). The checkpoint arguments are satisfied with a no-op loader (the network is already trained).

Methods:
* `ArnoldiInfluenceFunction`: rank (projection_dim) 10 from an Arnoldi basis of 20 vectors (arnoldi_dim), seed 0,
  other arguments at captum's defaults (arnoldi_tol 0.1, hessian_inverse_tol 1e-4). captum's defaults are
  projection_dim 50 / arnoldi_dim 200, but on MNIST (2 shared cores) each Arnoldi step – one HVP over the whole
  Hessian sample through `torch.autograd.functional.hvp` (double backward) – took ~7 s, and captum's training
  embeddings cost ~13 s per unit of rank (one pass over all 24,754 per-example gradients per projection vector),
  so rank 30 / arnoldi_dim 60 took 862 s and rank 10 / arnoldi_dim 20 took 305 s, within the ~5-minute budget
  (basis ≈ 2 × rank, as pyDVL's default Krylov dimension 2·rank+1). captum reseeds the global RNG
  (`torch.manual_seed(seed)`) before drawing the Arnoldi start vector – we run it inside `torch.random.fork_rng`
  so the caller's RNG is untouched.
* `NaiveInfluenceFunction` forms the dense Hessian (56k × 56k on MNIST, and `torch.autograd.functional.hessian`
  plus a non-symmetric `torch.linalg.eig`): digits check only (`captum_naive`, full rank), not in METHODS.
* TracIn / similarity influence in captum are not inverse-Hessian methods; not run.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .problem import Problem

ARNOLDI_RANK = 10  # see the module docstring: captum's 50/200 defaults would take ~40 min on MNIST here
ARNOLDI_DIM = 20


def _no_checkpoint(model: nn.Module, path: str) -> float:
    return 1.0  # captum insists on loading a checkpoint; the problem's network is already the trained one


def _loaders(p: Problem) -> tuple[DataLoader, DataLoader]:
    train = DataLoader(TensorDataset(p.x_train, p.y_train), batch_size=p.batch_size, shuffle=False)
    hess = DataLoader(TensorDataset(p.x_hessian, p.y_hessian), batch_size=p.batch_size, shuffle=False)
    return train, hess


def _score(p: Problem, inf) -> np.ndarray:
    n_h = len(p.hessian_index)
    test_emb = inf.compute_intermediate_quantities(
        DataLoader(TensorDataset(p.x_test, p.y_test), batch_size=p.batch_size), aggregate=True, test=True
    )  # (1, k): (Σ_t ∇ℓ(t))ᵀ R
    train_emb = inf.compute_intermediate_quantities(inf.train_dataloader)  # (m, k): ∇ℓ(z)ᵀ R
    captum_score = (train_emb.double() @ test_emb.double().T).reshape(-1)
    return (-n_h * captum_score).numpy()  # captum: +∇L_Tᵀ(H_c + n_hλ)⁻¹∇ℓ(z) with H_c = n_h H


def _run(p: Problem, cls, **kwargs) -> np.ndarray:
    model = copy.deepcopy(p.net).eval()  # captum adds hooks / reloads checkpoints on the model it is given
    train, hess = _loaders(p)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        inf = cls(
            model,
            train,
            checkpoint="(in memory)",
            checkpoints_load_func=_no_checkpoint,
            loss_fn=nn.CrossEntropyLoss(reduction="sum"),
            hessian_dataset=hess,
            sample_wise_grads_per_batch=True,
            seed=0,
            hessian_reg=len(p.hessian_index) * float(p.damping),
            show_progress=False,
            **kwargs,
        )
        return _score(p, inf)


def captum_arnoldi(rank: int, arnoldi_dim: int) -> Callable[[Problem], np.ndarray]:
    def method(p: Problem) -> np.ndarray:
        # not exported from captum.influence in 0.9.0 (only NaiveInfluenceFunction is); import from its module
        from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction

        return _run(p, ArnoldiInfluenceFunction, projection_dim=rank, arnoldi_dim=arnoldi_dim)

    return method


def captum_naive(p: Problem) -> np.ndarray:
    """Dense Hessian, all eigenpairs kept (projection_dim = number of parameters): small networks only."""
    from captum.influence import NaiveInfluenceFunction

    n_params = sum(q.numel() for q in p.net.parameters())
    return _run(p, NaiveInfluenceFunction, projection_dim=n_params)


METHODS: dict[str, Callable[[Problem], np.ndarray]] = {
    f"captum arnoldi (rank {ARNOLDI_RANK}, arnoldi_dim {ARNOLDI_DIM})": captum_arnoldi(ARNOLDI_RANK, ARNOLDI_DIM),
}


if __name__ == "__main__":
    import sys

    from .problem import build_problem

    prob = build_problem(sys.argv[1] if len(sys.argv) > 1 else "digits")
    for label, fn in METHODS.items():
        t = time.perf_counter()
        s = fn(prob)
        print(f"{label:40s} {time.perf_counter() - t:8.1f}s  norm {np.linalg.norm(s):.4g}")
