"""Inverse-Hessian-vector products: x ≈ H⁻¹ b for a block of right-hand sides (docs/MATH.md, "The solved systems").

Every solver takes a `Hessian` (anything with `matvec`, `size`, and for `exact` `dense`), a block B of shape (K, p)
and its settings, and returns X (K, p) with a `SolveReport`:

- `cg_normal` (the paper's): CG on (H² + λI) x = H b, two HVPs per iteration, fine for indefinite H.
- `cg`: CG on (H + λI) x = b, one HVP per iteration; needs H + λI positive definite.
- `lanczos` (the default): Lanczos on H from each b (full reorthogonalisation, one HVP per step) and the best answer
  over the Krylov space K_j(H, b): for the paper's system (`normal: true`, default) the one with the least
  (H² + λI)-norm error, which is never worse than cg_normal after j/2 iterations (2 HVPs each); with `normal: false`,
  MINRES on (H + λI) x = b. Handles indefinite H; stops when the relative change of x between steps falls below `tol`.
- `lowrank`: the same filter applied with `rank` Ritz pairs of H fitted once by Lanczos from a random start and cached
  (msif.influence.curvature): x = U f(θ) Uᵀ b, any number of targets for two small matrix products; an approximation
  (directions outside span(U) are dropped) whose residual is reported, measured on the first 2 columns. With
  `block: b` (and `steps: s`) the span grows by s Krylov blocks of the targets' own remainder, the b principal
  directions of what U misses (Rayleigh–Ritz on the union, b × s HVPs shared by all K targets; curvature.py).
- `lissa`: the truncated Neumann series x_{j+1} = b + (I − (H + λI)/scale) x_j, x = x_J / scale (Agarwal et al.;
  Koh & Liang), averaged over `repeats`, with divergence detection.
- `exact`: the explicit matrix and a dense solve of the paper's (H² + λI) x = H b (`normal: true`, the default, as
  for `lanczos` and `cg_normal`, whose dense ground truth it is), or of (H + λI) x = b (`normal: false`, the system
  of `cg`, `lissa` and MINRES); small models only.
- `identity`: H⁻¹ replaced by I (the paper's Figure 3 ablation); x = b.

Each report names the system it solved (`system`): two solvers rank the examples alike only when they solve the
same one (on the digits the two systems' scores correlate negatively). Each reports the relative residual
‖A x − r‖ / ‖r‖ of the system it solved (recomputed at the end from H x, not
the recursive estimate; lanczos has H x and H b from its own HVPs, exactly up to rounding, so its check costs one HVP
per column, H (H x), or none for MINRES), and ‖H x − b‖ / ‖b‖, how far x is from an exact inverse. NaN, infinity or
a residual above `max_residual` is an error (an unconverged solve is not presented as a ranking); above 10 × `tol`,
a warning.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from msif.errors import SolverError, UnconvergedSolveWarning
from msif.influence.curvature import largest_eigenvalue, retrain_filter, ritz_curvature, target_subspace
from msif.influence.krylov import Krylov
from msif.influence.settings import (
    CGSettings,
    ExactSettings,
    LanczosSettings,
    LissaSettings,
    LowrankSettings,
    SolverSettings,
    solver_settings,
)
from msif.progress import progress

CHECK_COLUMNS = 2  # lowrank: the residual is measured on this many columns (3 HVPs each), not on all K


@dataclass
class SolveReport:
    label: str
    method: str
    damping: float
    iterations: int = 0
    residual: float = 0.0  # max over the K columns, of the system actually solved
    inverse_residual: float | None = None  # max over columns of ‖(H + shift) x − b‖ / ‖b‖
    hvps: int = 0
    seconds: float = 0.0
    converged: bool = True
    history: list[float] = field(default_factory=list)  # max relative residual per iteration (CG) or step (LiSSA)
    factors: tuple | None = field(default=None, repr=False)  # lowrank: (C, U) with X = C U (RitzCurvature.factors)
    largest_eigenvalue: float | None = None  # |λ|_max of H, when the damping is relative to it
    relative_damping: float | None = None  # ρ: eigenvalues below ρ·|λ|_max damped
    retrain: tuple[float, int] | None = None  # (η, K) of the retrain response, when that replaced the inverse
    system: str = ""  # the system solved, e.g. "(H² + λI) x = H b": two solvers agree only when they solve the same one

    def as_dict(self) -> dict:
        kept = {k: v for k, v in self.__dict__.items() if k not in ("history", "factors")}
        return kept | {"history": self.history[-50:]}


def solve(
    H, B: torch.Tensor, settings: SolverSettings | Mapping[str, Any], label: str
) -> tuple[torch.Tensor, SolveReport]:
    """Solve H x = b for each row of B (K, p) with the solver `settings` name (a `SolverSettings`, or a mapping that
    `solver_settings` turns into one); see the module docstring. `label` names the Hessian in reports."""
    settings = solver_settings(settings, label)
    method = settings.method
    report = SolveReport(label, method, 0.0, retrain=settings.retrain, system=system_solved(settings))
    calls0, start = H.calls, time.perf_counter()
    damping = report.damping = resolve_damping(H, settings, report)  # its HVPs, if any, count as the solve's
    HX_known = HB_known = None  # H X and H B where the solver has them from its own HVPs (lanczos)
    if method == "identity":
        X = B.clone()
    elif method == "exact":
        X = _exact(H, B, damping, settings, label, report)
    elif method == "cg":
        X = _cg(lambda V: H.matvec(V) + damping * V, B, settings, report)
    elif method == "cg_normal":
        X = _cg(lambda V: H.matvec(H.matvec(V)) + damping * V, H.matvec(B), settings, report)
    elif method == "lanczos":
        X, HX_known, HB_known = _lanczos(H, B, damping, settings, report)
    elif method == "lowrank":
        curv = ritz_curvature(H, settings.rank, settings.seed)
        if settings.block:
            curv = target_subspace(H, curv, B, settings.block, settings.steps)
        report.factors = curv.factors(B, damping, settings.normal)
        X = report.factors[0] @ report.factors[1]
        report.iterations = len(curv.values)
    else:
        X = _lissa(H, B, damping, settings, report)
    if not torch.isfinite(X).all():
        raise SolverError(
            f"The {label} Hessian IHVP ({method}) produced NaN or infinite values.",
            "Increase the damping, or use the cg_normal or lanczos solver, which handle an indefinite Hessian.",
            hessian=label,
            keys=("damping",),
        )
    if method != "identity":
        Bc, Xc = (B[:CHECK_COLUMNS], X[:CHECK_COLUMNS]) if method == "lowrank" else (B, X)
        HX = H.matvec(Xc) if HX_known is None else HX_known
        report.inverse_residual = _max_rel(HX - Bc, Bc)
        normal = isinstance(settings, (ExactSettings, LanczosSettings, LowrankSettings)) and settings.normal
        if settings.retrain is not None:
            # a polynomial of H, not a linear system: lanczos reports its last relative change (exact once the
            # Krylov space has K + 1 vectors), exact the residual of H x = (I − (I − ηH)^K) b it set itself
            if method == "lanczos":
                report.residual = report.history[-1] if report.history else 0.0
        elif method == "cg":
            report.residual = _max_rel(HX + damping * Xc - Bc, Bc)
        elif method == "cg_normal" or normal:
            HB = H.matvec(Bc) if HB_known is None else HB_known
            report.residual = _max_rel(H.matvec(HX) + damping * Xc - HB, HB)
        else:  # exact, lissa, lanczos / lowrank with normal: false
            report.residual = _max_rel(HX + damping * Xc - Bc, Bc)
    report.hvps = H.calls - calls0
    report.seconds = time.perf_counter() - start
    if hasattr(H, "release"):
        H.release()  # kept gradient graphs (msif.influence.hessian) do not outlive the solve
    _check(report, settings)
    return X, report


SPECTRUM_STEPS = 20  # Lanczos steps from a seeded random start for |λ|_max: the extremes converge first


def resolve_damping(H, settings: SolverSettings, report: SolveReport | None = None) -> float:
    """The λ of the solve: `damping`, or with `relative_damping` ρ the λ that damps the eigenvalues of H below
    ρ·|λ|_max: ρ·|λ|_max for (H + λI) x = b, (ρ·|λ|_max)² for (H² + λI) x = H b (whose filter t / (t² + λ) turns
    over at |t| = √λ). |λ|_max comes from the Ritz values of SPECTRUM_STEPS Lanczos steps (seed 0), cached with H
    like the `lowrank` curvature, so every target block and later run of the same Hessian shares it."""
    rho = settings.relative_damping
    if settings.retrain is not None:  # the retrain response has no damping: its filter is bounded by ηK
        return 0.0
    if rho is None or settings.method == "identity":
        return float(settings.damping)
    if isinstance(settings, LowrankSettings):  # its own Ritz pairs hold the top of the spectrum already
        top = float(ritz_curvature(H, settings.rank, settings.seed).values.abs().max())
    else:
        top = largest_eigenvalue(H, SPECTRUM_STEPS, 0)
    if report is not None:
        report.largest_eigenvalue, report.relative_damping = top, float(rho)
    scale = float(rho) * top
    return scale * scale if system_solved(settings) == NORMAL_SYSTEM else scale


NORMAL_SYSTEM = "(H² + λI) x = H b"
PLAIN_SYSTEM = "(H + λI) x = b"


def system_solved(settings: SolverSettings) -> str:
    """The linear system a solver with these settings solves (the paper's normal equations or the damped one)."""
    if settings.method == "identity":
        return "x = b (H⁻¹ ≈ I)"
    if settings.retrain is not None:
        lr, steps = settings.retrain
        return f"x = (I − (I − {lr:g}·H)^{steps}) H⁻¹ b"
    if settings.method == "cg_normal" or getattr(settings, "normal", False):
        return NORMAL_SYSTEM
    return PLAIN_SYSTEM


def _max_rel(R: torch.Tensor, B: torch.Tensor) -> float:
    num = R.norm(dim=1)
    den = B.norm(dim=1).clamp_min(torch.finfo(B.dtype).tiny)
    return float((num / den).max())


def _check(report: SolveReport, settings: SolverSettings) -> None:
    tol, max_residual = float(settings.tol), float(settings.max_residual)
    r = report.residual
    steps = "dense solve" if report.method == "exact" else f"{report.iterations} iterations"
    where = f"{report.label} Hessian IHVP ({report.method}, damping {report.damping:g}, {steps})"
    if not math.isfinite(r) or r > max_residual:
        raise SolverError(
            f"The {where} did not converge: relative residual {r:.3g} > max_residual {max_residual:g}, so its "
            "scores would not be a ranking worth reading.",
            "Use the cg_normal or lanczos solver (they handle indefinite Hessians), raise the damping or the "
            "iterations, or raise max_residual to accept it.",
            hessian=report.label,
            keys=("damping", "iterations", "max_residual"),
        )
    report.converged = r <= 10 * tol  # CG stops on its recursive residual; the recomputed one may drift slightly
    if not report.converged and report.method != "identity":
        warnings.warn(
            f"the {where} stopped at relative residual {r:.3g} (tol {tol:g}); "
            f"‖Hx − b‖/‖b‖ = {report.inverse_residual:.3g}. {_remedy(report.method)}",
            UnconvergedSolveWarning,
            stacklevel=3,
        )


def _remedy(method: str) -> str:
    if method == "lowrank":
        return "It keeps only the span of its Ritz vectors: a larger rank, or the lanczos solver, tightens it."
    if method == "exact":  # a direct solve has no iterations to add: its error is the matrix's conditioning
        return "The damped Hessian is near-singular at this precision: dtype=float64 or more damping would tighten it."
    return "More iterations or damping would tighten it."


def _cg(apply_A, R0: torch.Tensor, settings: CGSettings, report: SolveReport) -> torch.Tensor:
    """Conjugate gradients on A X = R0, column by column in one block; frozen columns stop moving when converged."""
    iters, tol = settings.iterations, float(settings.tol)
    X = torch.zeros_like(R0)
    R = R0.clone()
    P = R.clone()
    rs = (R * R).sum(1)
    norm0 = R0.norm(dim=1).clamp_min(torch.finfo(R0.dtype).tiny)
    active = torch.ones(len(R0), dtype=torch.bool, device=R0.device)
    with progress(transient=True) as bar:
        task = bar.add_task(f"{report.label} ({report.method})", total=iters, info="")
        for it in range(iters):
            AP = apply_A(P)
            pAp = (P * AP).sum(1)
            alpha = torch.where(active & (pAp != 0), rs / pAp, torch.zeros_like(rs))
            X += alpha[:, None] * P
            R -= alpha[:, None] * AP
            rs_new = (R * R).sum(1)
            rel = rs_new.sqrt() / norm0
            report.history.append(float(rel.max()))
            report.iterations = it + 1
            bar.update(task, completed=it + 1, info=f"residual {report.history[-1]:.2e}")
            if not torch.isfinite(rel).all() or report.history[-1] > 1e8:
                break  # diverged: the final check reports it
            active = rel > tol
            if not active.any():
                break
            beta = torch.where(active, rs_new / rs.clamp_min(torch.finfo(rs.dtype).tiny), torch.zeros_like(rs))
            P = R + beta[:, None] * P
            rs = rs_new
    return X


LANCZOS_BASIS_BYTES = 2 * 2**30  # the Krylov bases of the columns solved together stay under this


def _lanczos(H, B: torch.Tensor, damping: float, settings: LanczosSettings, report: SolveReport):
    """Lanczos for every row of B, in groups whose Krylov bases (steps × p each) fit in LANCZOS_BASIS_BYTES.
    Returns X, H X and H B (the last two from the HVPs the steps made; see `_lanczos_block`)."""
    steps = settings.iterations + 1
    group = max(1, LANCZOS_BASIS_BYTES // (steps * B.shape[1] * B.element_size()))
    if len(B) <= group:
        return _lanczos_block(H, B, damping, settings, report)
    parts, histories = [], []
    for i in range(0, len(B), group):
        report.history = []
        parts.append(_lanczos_block(H, B[i : i + group], damping, settings, report))
        histories.append(report.history)
    longest = max(len(h) for h in histories)  # per step, the worst column of any group
    report.history = [max(h[j] for h in histories if j < len(h)) for j in range(longest)]
    report.iterations = longest
    return tuple(torch.cat(part) for part in zip(*parts, strict=True))


def _lanczos_block(H, B: torch.Tensor, damping: float, settings: LanczosSettings, report: SolveReport):
    """x = ‖b‖ Q y, the best answer over the Krylov space K_j(H, b) (see `_projected`), grown one HVP per step for
    every column at once (msif.influence.krylov); returns X, H X and H B.

    The solve stops when every column's ‖x_j − x_{j−1}‖ / ‖x_j‖ is below `tol` or its space is invariant (exact).
    H X = ‖b‖ Q C y and H B come from the HVPs the steps made (exact up to rounding), so the final residual check of
    the paper's system costs one HVP per column (H (H X)) instead of three.
    """
    iters, tol, normal = settings.iterations, float(settings.tol), settings.normal
    krylov = Krylov(H, B)
    y_prev = torch.zeros(len(B), 0, dtype=torch.float64, device=B.device)
    with progress(transient=True) as bar:
        task = bar.add_task(f"{report.label} (lanczos)", total=iters, info="")
        for j in range(iters):
            krylov.step()
            y = _projected(*krylov.tridiagonal(), damping, normal, settings.retrain)
            change = (y - torch.nn.functional.pad(y_prev, (0, 1))).norm(dim=1) / y.norm(dim=1).clamp_min(1e-300)
            y_prev = y
            report.history.append(float(change.max()))
            report.iterations = j + 1
            bar.update(task, completed=j + 1, info=f"change {report.history[-1]:.2e}")
            if j > 0 and bool(((change < tol) | ~krylov.live).all()):
                break
    return krylov.combine(y), krylov.apply_H(y), krylov.apply_H_to_b()


def _projected(
    alphas: torch.Tensor,
    betas: torch.Tensor | None,
    last: torch.Tensor,
    damping: float,
    normal: bool,
    retrain: tuple[float, int] | None = None,
):
    """The best y for x = ‖b‖ Q y over the Krylov space, per column, in float64, from the tridiagonal T (diagonal
    `alphas` (K, j), off-diagonal `betas` (K, j−1)) and the step's β_j `last` (K,), using H Q = Q T + β_j q_{j+1} e_jᵀ:

    * normal (the paper's system A x = H b, A = H² + λI): minimise the A-norm of the error over span(Q), i.e.
      (QᵀAQ) y = Qᵀ H b with QᵀH²Q = T² + β_j² e_j e_jᵀ and QᵀHb = ‖b‖ T e₁. span(Q) = K_j(H, b) contains the space
      CG on the normal equations searches after j/2 iterations, so this is never worse than cg_normal for the same
      HVPs;
    * else (H + λI) x = b: minimise the residual (MINRES), least squares with the (j+1) × j matrix [T + λI; β_j e_jᵀ];
      fine for an indefinite H + λI;
    * retrain (η, K): the Lanczos approximation of the matrix function, y = f(T) e₁ with f the retrain filter. f is
      a polynomial of degree K − 1, so it is exact once j ≥ K (Q p(T) e₁ = p(H) b for deg p < j).
    """
    K, j = alphas.shape
    T = torch.diag_embed(alphas.double())
    if betas is not None and betas.shape[1]:
        off = torch.diag_embed(betas.double(), offset=1)
        T = T + off + off.transpose(1, 2)
    e1 = torch.zeros(K, j, dtype=torch.float64, device=alphas.device)
    e1[:, 0] = 1.0
    eye = torch.eye(j, dtype=torch.float64, device=alphas.device)
    last = last.double()
    if retrain is not None:
        theta, V = torch.linalg.eigh(T)
        return torch.einsum("kij,kj->ki", V, retrain_filter(theta, *retrain) * V[:, 0, :])
    if normal:
        M = T @ T + damping * eye
        M[:, -1, -1] += last * last
        return torch.linalg.solve(M, T[:, :, 0])
    Tbar = torch.cat([T + damping * eye, torch.zeros(K, 1, j, dtype=torch.float64, device=alphas.device)], 1)
    Tbar[:, -1, -1] = last
    rhs = torch.cat([e1, torch.zeros(K, 1, dtype=torch.float64, device=alphas.device)], 1)
    return torch.linalg.lstsq(Tbar, rhs.unsqueeze(-1)).solution.squeeze(-1)


def _exact(
    H, B: torch.Tensor, damping: float, settings: ExactSettings, label: str, report: SolveReport
) -> torch.Tensor:
    max_params = settings.max_params
    if H.size > max_params:
        raise SolverError(
            f"The exact solver would form a {H.size:,} x {H.size:,} {label} Hessian, above "
            f"max_params={max_params:,} ({H.size**2 * B.element_size() / 2**30:.1f} GiB).",
            "Use the lanczos solver for a model this size, or raise max_params if the memory is there.",
            hessian=label,
            keys=("method", "max_params"),
        )
    dense = H.dense()
    eye = torch.eye(H.size, dtype=B.dtype, device=B.device)
    if settings.retrain is not None:
        lr, steps = settings.retrain
        theta, V = torch.linalg.eigh(dense.double())
        X = ((B.double() @ V) * retrain_filter(theta, lr, steps)) @ V.T
        # checked against the definition, not the eigendecomposition: H x = (I − (I − ηH)^K) b
        step = torch.linalg.matrix_power(eye.double() - lr * dense.double(), steps)
        Bd = B.double()
        report.residual = _max_rel(X @ dense.double() - (Bd - Bd @ step), Bd)
        return X.to(B.dtype)
    if settings.normal:
        return torch.linalg.solve(dense @ dense + damping * eye, dense @ B.T).T
    return torch.linalg.solve(dense + damping * eye, B.T).T


def _lissa(H, B: torch.Tensor, damping: float, settings: LissaSettings, report: SolveReport) -> torch.Tensor:
    scale = settings.scale
    if scale == "auto":
        scale = 1.1 * _largest_eigenvalue(H, B, damping)
    scale = float(scale)
    depth, repeats = settings.depth, settings.repeats
    total = torch.zeros_like(B)
    bnorm = B.norm(dim=1).clamp_min(torch.finfo(B.dtype).tiny)
    with progress(transient=True) as bar:
        task = bar.add_task(f"{report.label} (lissa)", total=depth * repeats, info="")
        for r in range(repeats):
            X = B.clone()
            for j in range(depth):
                X = B + X - (H.matvec(X) + damping * X) / scale
                growth = float((X.norm(dim=1) / bnorm).max())
                if not math.isfinite(growth) or growth > 1e8:
                    raise SolverError(
                        f"LiSSA diverged for the {report.label} Hessian at depth {j + 1} (‖x‖/‖b‖ = {growth:.3g}) with "
                        f"scale {scale:g}: the series only converges when every eigenvalue of H + λI lies in "
                        f"(0, 2·scale).",
                        "Raise the scale (or use scale=auto), raise the damping, or use the lanczos solver.",
                        hessian=report.label,
                        keys=("scale", "damping"),
                    )
                if j % 10 == 0 or j == depth - 1:
                    bar.update(task, completed=r * depth + j + 1, info=f"‖x‖/‖b‖ {growth:.3g}")
            total += X / scale
            report.iterations += depth
    return total / repeats


def _largest_eigenvalue(H, B: torch.Tensor, damping: float, iterations: int = 30) -> float:
    """|λ_max| of H + λI by power iteration, started from the first right-hand side."""
    v = B[:1] / B[:1].norm().clamp_min(1e-30)
    lam = 0.0
    for _ in range(iterations):
        w = H.matvec(v) + damping * v
        lam = float(w.norm())
        if lam == 0.0:
            break
        v = w / lam
    return lam
