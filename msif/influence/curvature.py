"""A Hessian's curvature fitted once and reused for any number of targets: Ritz pairs from Lanczos, cached on disk.

`fit_ritz(H, rank, seed)` runs `rank` Lanczos steps on H from a seeded random start (full reorthogonalisation, one
HVP per step) and keeps the Ritz pairs (θᵢ, uᵢ): H ≈ U diag(θ) Uᵀ on span(U), which holds the top of the spectrum of
both signs first. `RitzCurvature.apply(B)` is then U f(θ) Uᵀ b for every row b of B at the cost of two small matrix
products, with f the solver's filter (the paper's t / (t² + λ), or 1 / (t + λ)); directions outside span(U) are
dropped, as in Arnoldi-style influence (Schioppa et al., 2022). It is an approximation whose quality the solver
reports (the residual of the system) and benchmarks/many_targets.py measures against converged solves.

`ritz_curvature(H, rank, seed)` returns the pairs from memory (`H.ritz_pairs`), else from `H.cache_dir` (a file
named by the Hessian's fingerprint, rank and seed, loaded with weights_only=True), else fits them and writes that
file atomically.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from msif import distributed
from msif.influence.krylov import Krylov
from msif.io import atomic_torch_save, load_tensors
from msif.progress import progress

log = logging.getLogger(__name__)

FORMAT = 1


class CurvatureSource(Protocol):
    """What `ritz_curvature` needs of a Hessian (msif.influence.hessian.Hessian is one)."""

    point: torch.Tensor  # the point H is taken at (its dtype and device)
    cache_dir: Path | None  # where fitted pairs are kept between runs (None: memory only)
    ritz_pairs: dict  # (rank, seed) -> RitzCurvature, in memory
    calls: int  # Hessian-vector products so far

    @property
    def size(self) -> int: ...

    def matvec(self, V: torch.Tensor) -> torch.Tensor: ...

    def fingerprint(self) -> str: ...


def spectral_filter(theta: torch.Tensor, damping: float, normal: bool) -> torch.Tensor:
    """f(θ) of the solve: θ / (θ² + λ) for the paper's normal equations, else 1 / (θ + λ)."""
    return theta / (theta * theta + damping) if normal else 1.0 / (theta + damping)


def retrain_filter(theta: torch.Tensor, lr: float, steps: int) -> torch.Tensor:
    """f(θ) = (1 − (1 − ηθ)^K) / θ = η Σ_{i<K} (1 − ηθ)^i: how K gradient-descent steps at rate η respond along an
    eigenvector of curvature θ (docs/MATH.md, "The retrain response"); ηK at θ = 0, 1/θ once ηθK ≫ 1.

    The numerator is −expm1(K·log1p(−ηθ)) where ηθ < 1, which keeps its relative precision for tiny ηθ (the
    direct 1 − (1 − ηθ)^K cancels); where ηθ ≥ 1 the power has no cancellation to fear."""
    x = lr * theta
    safe = torch.where(x.abs() < 1e-300, torch.ones_like(x), x)
    below = x < 1
    num_below = -torch.expm1(steps * torch.log1p(-torch.where(below, safe, torch.zeros_like(safe))))
    num_above = 1.0 - torch.pow(1.0 - torch.where(below, torch.zeros_like(safe), safe), steps)
    f = lr * torch.where(below, num_below, num_above) / safe
    return torch.where(x.abs() < 1e-300, torch.full_like(x, lr * steps), f)


@dataclass
class RitzCurvature:
    values: torch.Tensor  # (k,) Ritz values θ
    vectors: torch.Tensor  # (k, p) orthonormal Ritz vectors
    hvps: int = 0
    seconds: float = 0.0

    def apply(self, B: torch.Tensor, damping: float, normal: bool) -> torch.Tensor:
        """U f(θ) Uᵀ bᵀ for every row b of B (K, p) -> (K, p)."""
        coefficients, U = self.factors(B, damping, normal)
        return coefficients @ U

    def factors(self, B: torch.Tensor, damping: float, normal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(C, U) with `apply(B) = C U`: C = (B Uᵀ) f(θ) (K, k). Scores are linear in the solved vectors, so K
        targets can be scored as the k rows of U and combined by C, which is cheaper when K > k."""
        U = self.vectors.to(B.device, B.dtype)
        f = spectral_filter(self.values.double(), damping, normal).to(B.device, B.dtype)
        return (B @ U.T) * f, U


def fit_ritz(H: CurvatureSource, rank: int, seed: int = 0) -> RitzCurvature:
    """`rank` Lanczos steps on H (msif.influence.krylov) from a random unit vector (seeded) -> Ritz pairs."""
    start = time.perf_counter()
    calls0 = H.calls
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, H.size, generator=g, dtype=torch.float64).to(H.point.device, H.point.dtype)
    krylov = Krylov(H, q)
    with progress(transient=True) as bar:
        task = bar.add_task("fitting the Hessian's Ritz pairs (lanczos)", total=rank, info="")
        for j in range(min(rank, H.size)):
            krylov.step()
            bar.update(task, completed=j + 1)
            if not bool(krylov.live.all()):
                break  # an invariant subspace: the pairs are exact on it
    alphas, off, _ = krylov.tridiagonal()
    T = torch.diag(alphas[0].double())
    if off is not None:
        T = T + torch.diag(off[0].double(), 1) + torch.diag(off[0].double(), -1)
    theta, V = torch.linalg.eigh(T)
    vectors = V.T.to(H.point.dtype).to(H.point.device) @ krylov.basis(krylov.steps)[0]
    return RitzCurvature(theta, vectors, H.calls - calls0, time.perf_counter() - start)


def ritz_curvature(H: CurvatureSource, rank: int, seed: int = 0) -> RitzCurvature:
    """The Ritz pairs of H for (rank, seed): memory, then H.cache_dir, then a fit (saved to H.cache_dir)."""
    key = (int(rank), int(seed))
    memo = H.ritz_pairs
    if key in memo:
        return memo[key]
    cache_dir = H.cache_dir
    file = Path(cache_dir) / f"ritz-{H.fingerprint()}-r{rank}-s{seed}.pt" if cache_dir else None
    saved = load_tensors(file) if file is not None and file.exists() else None
    if saved is not None and saved.get("format") == FORMAT and saved["vectors"].shape[1] == H.size:
        curv = RitzCurvature(saved["values"], saved["vectors"].to(H.point.device))
        log.info("curvature: reusing %d Ritz pairs from %s", len(curv.values), file)
    else:
        curv = fit_ritz(H, rank, seed)
        log.info(
            "curvature: fitted %d Ritz pairs (%d HVPs, %.1f s); θ in [%.3g, %.3g]",
            len(curv.values),
            curv.hvps,
            curv.seconds,
            float(curv.values.min()),
            float(curv.values.max()),
        )
        if file is not None and distributed.is_main():  # under torchrun every process fits the same pairs
            atomic_torch_save(
                {
                    "format": FORMAT,
                    "values": curv.values,
                    "vectors": curv.vectors.cpu(),
                    "fingerprint": H.fingerprint(),
                },
                file,
            )
    memo[key] = curv
    return curv


def largest_eigenvalue(H: CurvatureSource, steps: int = 20, seed: int = 0) -> float:
    """|λ|max of H: the largest |Ritz value| of `steps` Lanczos steps from a seeded random start (the extremes of the
    spectrum converge first). Kept in memory and, as a few numbers (not the vectors), in `H.cache_dir`."""
    key = ("largest", int(steps), int(seed))
    memo = H.ritz_pairs
    if key in memo:
        return memo[key]
    cache_dir = H.cache_dir
    file = Path(cache_dir) / f"spectrum-{H.fingerprint()}-r{steps}-s{seed}.pt" if cache_dir else None
    saved = load_tensors(file) if file is not None and file.exists() else None
    if saved is not None and saved.get("format") == FORMAT:
        values = saved["values"]
    else:
        values = fit_ritz(H, steps, seed).values
        log.info("spectrum: %d Ritz values in [%.3g, %.3g]", len(values), float(values.min()), float(values.max()))
        if file is not None and distributed.is_main():
            atomic_torch_save({"format": FORMAT, "values": values.cpu(), "fingerprint": H.fingerprint()}, file)
    memo[key] = top = float(values.abs().max())
    return top


def target_subspace(H: CurvatureSource, curv: RitzCurvature, B: torch.Tensor, block: int, steps: int) -> RitzCurvature:
    """Ritz pairs of H on span(U) ⊕ Z, for the targets B (K, p): U the cached Ritz vectors (the top of the spectrum,
    whatever the targets), Z a block Krylov space of the targets' own remainder, Rayleigh–Ritz on the union.

    The remainder D = (I − UUᵀ) B is what `lowrank` drops; its `block` leading principal directions (of DᵀD, from
    the K × K Gram matrix) start the block, and each of `steps` steps applies H to the newest block and orthogonalises
    it against everything so far (two Gram–Schmidt passes), `block` HVPs per step. The block also carries the one
    direction in which H U leaves span(U) (the next Lanczos vector: one HVP more, and one more per step). The
    projected matrix M = [U; Z] H [U; Z]ᵀ needs only H Z: UᵀHU = diag(θ) holds for Lanczos Ritz vectors, and
    UᵀHZ = (H Z Uᵀ)ᵀ. Its eigenpairs are the Ritz pairs of the union, so `apply` is the Galerkin approximation of the
    solve there: every target shares the (block + 1) × steps HVPs, however many targets there are."""
    start, calls0 = time.perf_counter(), H.calls
    U = curv.vectors.to(B.device, B.dtype)
    floor = torch.finfo(B.dtype).eps ** 0.5  # a direction that keeps less of its norm is rounding, not new
    D = _orthogonal_to(B, U)
    values, W = torch.linalg.eigh((D @ D.T).double())
    values, W = values.flip(0)[:block], W.flip(1)[:, :block]
    scale = float((B * B).sum(1).max()) if len(B) else 0.0
    Q = (W[:, values > (floor**2) * scale].to(B.dtype)).T @ D
    if len(U) < H.size:
        # U is not invariant: H U leaves span(U) along one direction, the next Lanczos vector, which f(H) U b needs.
        # H w − U θ-weighted for w = Σ u_i lies along it (one HVP), and it starts the block with the targets.
        w = U.sum(0, keepdim=True)
        leak = H.matvec(w) - (curv.values.to(U.dtype) @ U).unsqueeze(0)
        Q = torch.cat([leak, Q])
    blocks, H_blocks = [], []
    for _ in range(steps):
        if not len(Q):
            break  # the targets' remainder lies in the space already built
        before = Q.norm(dim=1).max()
        Qt, R = torch.linalg.qr(_orthogonal_to(Q, torch.cat([U, *blocks])).T)
        Q = Qt.T[R.diagonal().abs() > floor * before]
        if not len(Q):
            break
        HQ = H.matvec(Q)
        blocks.append(Q)
        H_blocks.append(HQ)
        Q = HQ
    Z, HZ = torch.cat([U[:0], *blocks]), torch.cat([U[:0], *H_blocks])
    k = len(U)
    M = torch.zeros(k + len(Z), k + len(Z), dtype=torch.float64, device=B.device)
    M[:k, :k] = torch.diag(curv.values.to(M))
    cross = (HZ @ U.T).double()  # (|Z|, k): Z H U
    M[k:, :k] = cross
    M[:k, k:] = cross.T
    inner = (HZ @ Z.T).double()
    M[k:, k:] = (inner + inner.T) / 2
    theta, V = torch.linalg.eigh(M)
    vectors = V.T.to(B.dtype) @ torch.cat([U, Z])
    return RitzCurvature(theta, vectors, H.calls - calls0, time.perf_counter() - start)


def _orthogonal_to(Q: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """The rows of Q with their components along the orthonormal rows of `basis` removed (two Gram–Schmidt passes,
    as in the Lanczos process, so that rounding leaves no component behind)."""
    for _ in range(2):
        Q = Q - (Q @ basis.T) @ basis
    return Q
