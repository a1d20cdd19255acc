"""dattri 0.3.0 (TRAIS-Lab; github.com/TRAIS-Lab/dattri) influence-function attributors on the shared problem.

Convention conversion (read from dattri's source, checked against msif's exact solver on digits):
* An inner-product attributor scores  S(z) = +transform_train_rep(∇ℓ(z)) · transform_test_rep(∇f(T))
  (dattri/algorithm/base.py `attribute`: `train_batch_rep @ test_batch_rep.T`), with transform_test_rep = (H + λI)⁻¹·
  for CG/LiSSA/DataInf/EK-FAC and both transforms = Λ^{-1/2}Vᵀ· for Arnoldi. No minus sign, so we return −S.
* dattri's loss and target functions are torch.func-style functions of (params, data). Ours is the MEAN cross-entropy
  of whatever batch it is given (reshaped so that the same function serves a single example, a Hessian batch, and
  the whole test set as one data point). The Hessian used by the IHVPs is that of the loss on one DataLoader batch
  holding the whole Hessian sample, i.e. H of the mean loss, as msif. (CG/LiSSA SUM the IHVPs of the
  separate batches of `full_train_dataloader`, dattri/algorithm/influence_function.py, so it must be one batch.)
* The target: the whole test set is passed as ONE data point, so dattri's per-example target gradient is the
  gradient of the MEAN test loss L_T / n_test — one aggregated target. We multiply it by n_test to get ∇L_T.
* Damping: CG and Arnoldi take `regularization` = λ added as λI to the Hessian (hvp + λv); EK-FAC takes
  `damping` = λ added to its eigenvalues; DataInf's `regularization` = λ is the λ of its per-layer
  (G_l + λI)⁻¹ approximation. LiSSA iterates x ← v + (1 − d)x − Hx/s and returns x/s, whose fixed point is
  (H + s·d·I)⁻¹v, so we pass d = λ/s.
* dattri's `attribute()` recomputes the test-side transform (the whole IHVP solve) for every training batch
  (base.py loops test batches inside the train-batch loop). To solve once, as a user with one target would, we call
  the attributor's own steps directly — generate_test_rep / transform_test_rep once, then generate_train_rep /
  transform_train_rep per training batch and the same inner product — which is what `attribute()` computes.

Not run: `IFAttributorExplicit` forms the dense Hessian with torch.func (56,196² floats = 12.6 GB on MNIST; even on
the 5,316-parameter digits check its vmapped Hessian took over 21 GB and was killed for memory). TracIn, TRAK, RPS,
LoGra, FactGraSS, BlockProjectedIF, DVEmb and KNN-Shapley are not an (H + λI)⁻¹ influence function of all
parameters (no curvature, or random-projected gradients with a projected Fisher). dattri's EK-FAC only supports
nn.Linear modules (its forward hook and weight reshape assume 2-D weights), so on these CNNs it covers only the
linear head; its label says so. All runs use a deep copy of p.net (dattri's
default checkpoint loader calls load_state_dict on the model) and fork torch's global RNG (LiSSA's sampling and
Arnoldi's torch.manual_seed would otherwise change the caller's random state), seeded with 0.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from dattri.algorithm.influence_function import (
    IFAttributorArnoldi,
    IFAttributorCG,
    IFAttributorDataInf,
    IFAttributorEKFAC,
    IFAttributorLiSSA,
)
from dattri.task import AttributionTask
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from .problem import Problem


def _task(p: Problem) -> AttributionTask:
    model = copy.deepcopy(p.net).eval()
    in_shape = tuple(p.x_train.shape[1:])

    def mean_ce(params, data):
        x, y = data
        logits = functional_call(model, params, (x.reshape(-1, *in_shape),))
        return F.cross_entropy(logits, y.reshape(-1).long())  # .long(): dattri's LiSSA casts labels to float

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return AttributionTask(loss_func=mean_ce, model=model, checkpoints=state)


def _hessian_loader(p: Problem, one_batch: bool = True) -> DataLoader:
    data = TensorDataset(p.x_hessian, p.y_hessian)
    return DataLoader(data, batch_size=len(data) if one_batch else p.batch_size, shuffle=False)


def _scores(p: Problem, attributor) -> np.ndarray:
    """−(∇ℓ(z) transformed) · (∇L_T transformed) for every training example, with the test transform done once."""
    n_test = len(p.y_test)
    whole_test_set = (p.x_test[None, None], p.y_test[None, None])  # (1, 1, n_test, ...): one data point
    test_rep = attributor.generate_test_rep(ckpt_idx=0, data=whole_test_set) * n_test  # ∇(mean) · n = ∇L_T
    test_rep = attributor.transform_test_rep(ckpt_idx=0, test_rep=test_rep).detach()  # (1, d)
    out = []
    train = DataLoader(TensorDataset(p.x_train, p.y_train), batch_size=p.batch_size, shuffle=False)
    for xb, yb in train:
        rep = attributor.generate_train_rep(ckpt_idx=0, data=(xb[None], yb[None]))
        rep = attributor.transform_train_rep(ckpt_idx=0, train_rep=rep).detach()
        out.append((rep @ test_rep.T).reshape(-1))
    return -torch.cat(out).double().numpy()


def _run(p: Problem, make, one_batch: bool = True, autograd_cache: bool = False, cache=None) -> np.ndarray:
    # torch.no_grad(): dattri's flattened parameters require grad, so every HVP it computes with torch.func is also
    # recorded by ordinary autograd and the graph of a whole CG / Arnoldi / LiSSA run is kept alive until the final
    # .detach(), which runs out of memory on MNIST (docs/peer-benchmark.md). torch.func
    # transforms ignore an outer no_grad, so the results are unchanged. EK-FAC's cache needs ordinary autograd.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        attributor = make(_task(p))
        with torch.enable_grad() if autograd_cache else torch.no_grad():
            if cache is None:
                attributor.cache(_hessian_loader(p, one_batch))
            else:
                cache(attributor, _hessian_loader(p, one_batch))
        with torch.no_grad():
            return _scores(p, attributor)


def cg(p: Problem, iterations: int) -> np.ndarray:
    # dattri's CG starts from x0 = v and always runs max_iter iterations: its `tol` is unused in 0.3.0, so a CG
    # that has converged keeps iterating in float32 on a rounding-level residual; on the digits check it is exact
    # from 10 to 100 iterations and breaks down after that (150 it: r 0.9999; 200 it: r −0.39, norm × 1.8e6).
    return _run(p, lambda t: IFAttributorCG(t, device="cpu", max_iter=iterations, regularization=p.damping))


def lissa(p: Problem, depth: int, batch: int, scale: float | None = None) -> np.ndarray:
    # dattri's default scaling is 50 (and depth 5000, batch 1). The series only converges when the eigenvalues of
    # H_batch + λI stay below 2s; like msif's `scale: auto` we use s = 1.1 × the largest eigenvalue of H + λI
    # (20 power iterations with dattri's own hvp on the Hessian sample) unless `scale` is given.
    if scale is None:
        scale = 1.1 * _largest_eigenvalue(p, iterations=20)
    return _run(
        p,
        lambda t: IFAttributorLiSSA(
            t,
            device="cpu",
            batch_size=batch,
            num_repeat=1,
            recursion_depth=depth,
            damping=p.damping / scale,
            scaling=scale,
        ),
    )


def _largest_eigenvalue(p: Problem, iterations: int) -> float:
    from dattri.func.hessian import hvp_at_x

    task = _task(p)
    params = task.get_param(0)[0].detach()
    func = partial(task.get_loss_func(), data=(p.x_hessian, p.y_hessian))
    hvp = hvp_at_x(func, x=(params,), argnums=0, mode="rev-rev", regularization=p.damping)
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(params.shape, generator=gen, dtype=params.dtype)
    lam = 0.0
    for _ in range(iterations):
        v = v / v.norm()
        hv = hvp(v).detach()
        lam = float(v @ hv)
        v = hv
    return abs(lam)


def arnoldi(p: Problem, rank: int, iterations: int) -> np.ndarray:
    # IFAttributorArnoldi keeps the `rank` Ritz pairs of largest |eigenvalue| of H + λI from `iterations` Arnoldi
    # steps (a run yields iterations − 1 of them: dattri's defaults, 100/100, give rank 99) and scores
    # S = (Λ^{-1/2}Vᵀ∇ℓ(z))·(Λ^{-1/2}Vᵀ∇L_T), dropping the rest of the spectrum. Two problems with its `cache` here,
    # so we build its ArnoldiProjector (dattri.func.projection) ourselves, with the same arguments otherwise:
    # * eigenvalues ≤ 0: on MNIST 27 of the top 100 Ritz values of H + 0.01 I are negative. dattri warns that it
    #   lowers proj_dim "to the number of positive eigenvalues" but does not drop those pairs, so Λ^{-1/2} is NaN
    #   and so is every score. We drop them, as its warning says (same test: eigenvalue > tol²).
    # * its HVPs are forward-over-reverse ("rev-fwd", not settable from the attributor), ~1.8× the cost of
    #   reverse-over-reverse on the MNIST Hessian sample; arnoldi_project's `mode` argument selects "rev-rev".
    # Iterations: well above the rank. Once the Krylov space has converged (digits, λ = 0.1, after some 30 steps) the
    # float32 Arnoldi vectors lose orthogonality and near-zero spurious Ritz values (±4e-8) appear; with 101 steps
    # they are among the 100 kept and Λ^{-1/2} blows the scores up (digits: norm × 1.5e6); with 150 they are not.
    from dattri.func.projection import ArnoldiProjector

    def cache(attributor, loader):
        params = attributor.task.get_param(0)[0].detach()
        func = partial(attributor.task.get_loss_func(), data=(p.x_hessian, p.y_hessian))
        projector = ArnoldiProjector(
            feature_dim=len(params), proj_dim=rank, func=func, x=params, argnums=0, max_iter=iterations,
            norm_constant=1.0, tol=1e-7, mode="rev-rev", regularization=p.damping, seed=0, device="cpu",
        )  # fmt: skip
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Encountered many negative eigenvalues")
            projector.get_eigenspace()
        keep = projector.eigvals > projector.tol**2
        projector.eigvals, projector.eigvecs = projector.eigvals[keep], projector.eigvecs[keep]
        attributor.full_train_dataloader = loader
        attributor.arnoldi_projectors = [projector.project]

    return _run(p, lambda t: IFAttributorArnoldi(t, device="cpu", regularization=p.damping), cache=cache)


def datainf(p: Problem) -> np.ndarray:
    return _run(p, lambda t: IFAttributorDataInf(t, device="cpu", regularization=p.damping), one_batch=False)


def ekfac(p: Problem) -> np.ndarray:
    # module_name=None: every nn.Linear (here only the head; dattri's EK-FAC cannot handle nn.Conv2d). Empirical
    # Fisher (true labels) of the mean loss over the Hessian sample; damping added to the eigenvalues.
    return _run(
        p, lambda t: IFAttributorEKFAC(t, device="cpu", damping=p.damping), one_batch=False, autograd_cache=True
    )


METHODS: dict[str, Callable[[Problem], np.ndarray]] = {
    "dattri cg (10 it)": lambda p: cg(p, 10),
    "dattri cg (50 it)": lambda p: cg(p, 50),
    "dattri lissa (depth 200, batch 100, scale auto)": lambda p: lissa(p, depth=200, batch=100),
    "dattri arnoldi (rank 100, 150 it)": lambda p: arnoldi(p, rank=100, iterations=150),
    "dattri datainf": datainf,
    "dattri ekfac (linear head only)": ekfac,
}
