"""IHVP solvers on explicit symmetric matrices (indefinite ones included), against dense linear algebra."""

from __future__ import annotations

import pytest
import torch

from msif.influence.solvers import solve


class Dense:
    """A symmetric matrix behind the `Hessian` interface (matvec on row blocks, HVP count, dense)."""

    def __init__(self, A: torch.Tensor):
        self.A, self.size, self.calls = A, len(A), 0

    def matvec(self, V: torch.Tensor) -> torch.Tensor:
        self.calls += len(V)
        return V @ self.A

    def dense(self) -> torch.Tensor:
        return self.A


def indefinite(p: int, seed: int = 0, negative: int = 5) -> torch.Tensor:
    """Q diag(eigs) Qᵀ with eigenvalues spread over [1e-3, 10] and `negative` of them in [−1, −0.05]."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))
    eigs = torch.logspace(-3, 1, p, dtype=torch.float64)
    eigs[:negative] = -torch.linspace(0.05, 1.0, negative, dtype=torch.float64)
    return (Q * eigs) @ Q.T


@pytest.mark.parametrize("normal", [True, False])
def test_lanczos_equals_the_dense_filter_on_an_indefinite_matrix(normal):
    p, lam = 80, 0.01
    A = indefinite(p)
    B = torch.randn(4, p, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    eye = torch.eye(p, dtype=torch.float64)
    want = (torch.linalg.solve(A @ A + lam * eye, A @ B.T) if normal else torch.linalg.solve(A + lam * eye, B.T)).T
    H = Dense(A)
    X, report = solve(
        H, B, {"method": "lanczos", "damping": lam, "iterations": 500, "tol": 1e-14, "normal": normal}, "t"
    )
    assert float((X - want).norm() / want.norm()) < 1e-9
    assert report.iterations <= p  # the Krylov space is all of R^p after p steps: exact, then it stops
    assert report.residual < 1e-9


def test_lanczos_needs_fewer_hvps_than_cg_normal_for_the_same_residual():
    """Same Krylov information, used better: Lanczos gets one new direction per HVP, CG on H² + λI one per two."""
    p, lam = 400, 0.01
    A = indefinite(p, seed=2)
    b = torch.randn(1, p, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    lz, cg = Dense(A), Dense(A)
    _, r_lz = solve(lz, b, {"method": "lanczos", "damping": lam, "iterations": 60, "tol": 0.0}, "t")
    _, r_cg = solve(
        cg, b, {"method": "cg_normal", "damping": lam, "iterations": 60, "tol": 0.0, "max_residual": 1e9}, "t"
    )
    assert r_lz.residual < r_cg.residual
    assert r_lz.hvps < r_cg.hvps


def test_lanczos_stops_at_an_invariant_subspace():
    """b in the span of 3 eigenvectors: the Krylov space is 3-dimensional and the answer exact after 3 steps. Whether
    step 4 is flagged invariant (β ≈ 0) or runs on a rounding-level direction depends on the BLAS's summation order
    (with 2 threads β/‖Hq‖ was ~5e-13, just above the 1e3·eps test), so the stop is allowed two steps later."""
    p, lam = 50, 0.01
    A = indefinite(p, seed=4)
    eigs, V = torch.linalg.eigh(A)
    b = (V[:, [0, 10, 40]] @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)).unsqueeze(0)
    X, report = solve(Dense(A), b, {"method": "lanczos", "damping": lam, "iterations": 40, "tol": 1e-14}, "t")
    want = torch.linalg.solve(A @ A + lam * torch.eye(p, dtype=torch.float64), A @ b.T).T
    assert float((X - want).norm() / want.norm()) < 1e-10
    assert report.iterations <= 6


class DenseWithPoint(Dense):
    """`Dense` with what the cached curvature needs (msif.influence.curvature.CurvatureSource): a point (dtype,
    device), a cache folder, the in-memory pairs and a fingerprint."""

    def __init__(self, A, cache_dir=None):
        super().__init__(A)
        self.point = torch.zeros(len(A), dtype=A.dtype)
        self.cache_dir = cache_dir
        self.ritz_pairs = {}

    def fingerprint(self) -> str:
        return "dense-" + str(abs(hash(self.A.sum().item())))


def test_lowrank_at_full_rank_is_the_exact_filter_and_is_cached(tmp_path):
    p, lam = 60, 0.01
    A = indefinite(p, seed=5)
    B = torch.randn(3, p, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    want = torch.linalg.solve(A @ A + lam * torch.eye(p, dtype=torch.float64), A @ B.T).T
    H = DenseWithPoint(A, tmp_path)
    settings = {"method": "lowrank", "damping": lam, "rank": p, "tol": 1e-8}
    X, report = solve(H, B, settings, "t")
    assert float((X - want).norm() / want.norm()) < 1e-9
    assert report.hvps >= p and len(list(tmp_path.glob("ritz-*.pt"))) == 1
    # a new Hessian object over the same matrix reads the pairs from disk: no fitting HVPs, same answer
    H2 = DenseWithPoint(A, tmp_path)
    X2, report2 = solve(H2, B, settings, "t")
    assert torch.equal(X, X2)
    from msif.influence.solvers import CHECK_COLUMNS

    assert report2.hvps == 3 * min(len(B), CHECK_COLUMNS)  # only the residual check, on the first columns


def test_lowrank_keeps_the_top_of_the_spectrum_of_both_signs():
    """A few large eigenvalues of each sign and a small bulk: rank 10 captures the large ones, and the answer on a
    vector in their span is exact while the bulk's share is dropped."""
    p, lam = 200, 0.01
    g = torch.Generator().manual_seed(7)
    Q, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))
    eigs = torch.full((p,), 1e-4, dtype=torch.float64)
    eigs[:4] = torch.tensor([-3.0, -2.0, 5.0, 8.0], dtype=torch.float64)
    A = (Q * eigs) @ Q.T
    from msif.influence.curvature import fit_ritz

    curv = fit_ritz(DenseWithPoint(A), rank=10, seed=0)
    top = torch.sort(curv.values).values
    assert torch.allclose(top[[0, 1, -2, -1]], eigs[:4].sort().values, atol=1e-8)
    b = (Q[:, :4] @ torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)).unsqueeze(0)
    want = torch.linalg.solve(A @ A + lam * torch.eye(p, dtype=torch.float64), A @ b.T).T
    assert float((curv.apply(b, lam, True) - want).norm() / want.norm()) < 1e-8


@pytest.mark.parametrize("damping", [1e-2, 1e-6])
def test_lanczos_error_never_exceeds_cg_normal_with_the_same_hvps(damping):
    """Lanczos with 2k steps minimises the (H² + λI)-norm error over K_2k(H, b), which contains CG's space after k
    iterations on the normal equations (2k HVPs): its error is never larger, even when λ is tiny."""
    p = 300
    A = indefinite(p, seed=8, negative=20)
    b = torch.randn(1, p, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    M = A @ A + damping * torch.eye(p, dtype=torch.float64)
    want = torch.linalg.solve(M, A @ b.T).T

    def a_norm_error(X):
        e = X - want
        return float((e @ M @ e.T).sqrt())

    for k in (3, 10, 25):
        X_lz, _ = solve(Dense(A), b, {"method": "lanczos", "damping": damping, "iterations": 2 * k, "tol": 0.0}, "t")
        cg = {"method": "cg_normal", "damping": damping, "iterations": k, "tol": 0.0, "max_residual": 1e9}
        X_cg, _ = solve(Dense(A), b, cg, "t")
        assert a_norm_error(X_lz) <= a_norm_error(X_cg) * (1 + 1e-9)


def test_lanczos_in_groups_equals_lanczos_in_one_block(monkeypatch):
    """Columns whose Krylov bases exceed the memory budget are solved group by group, with the same answers."""
    from msif.influence import solvers

    A = indefinite(40, seed=10)
    B = torch.randn(5, 40, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    settings = {"method": "lanczos", "damping": 0.01, "iterations": 30, "tol": 1e-10}
    X1, r1 = solve(Dense(A), B, settings, "t")
    monkeypatch.setattr(solvers, "LANCZOS_BASIS_BYTES", 2 * 31 * 40 * 8)  # two columns per group
    X2, r2 = solve(Dense(A), B, settings, "t")
    assert torch.allclose(X1, X2, rtol=0, atol=1e-12 * float(X1.abs().max()))
    assert r2.iterations == r1.iterations and abs(r2.residual - r1.residual) < 1e-12


@pytest.mark.parametrize("normal", [True, False])
def test_lanczos_residuals_equal_directly_computed_ones_and_cost_at_most_one_hvp(normal):
    """The reported residuals come from the HVPs the steps already made (H X = ‖b‖ Q C y): in float32, stopped far
    from convergence, they must equal ‖(H² + λI)x − Hb‖/‖Hb‖ (or ‖(H + λI)x − b‖/‖b‖) and ‖Hx − b‖/‖b‖ computed
    here with the dense matrix, and the check costs one HVP (normal) or none (MINRES)."""
    p, lam, steps = 120, 0.01, 12
    A = indefinite(p, seed=4).float()
    B = torch.randn(3, p, generator=torch.Generator().manual_seed(5)).float()
    H = Dense(A)
    X, report = solve(
        H,
        B,
        {"method": "lanczos", "damping": lam, "iterations": steps, "tol": 0.0, "normal": normal, "max_residual": 1e9},
        "t",
    )
    A64, X64, B64 = A.double(), X.double(), B.double()
    HX = X64 @ A64
    if normal:
        HB = B64 @ A64
        want = ((HX @ A64 + lam * X64 - HB).norm(dim=1) / HB.norm(dim=1)).max()
    else:
        want = ((HX + lam * X64 - B64).norm(dim=1) / B64.norm(dim=1)).max()
    want_inverse = ((HX - B64).norm(dim=1) / B64.norm(dim=1)).max()
    assert report.residual > 1e-3  # really unconverged, so the comparison means something
    assert report.residual == pytest.approx(float(want), rel=1e-3)
    assert report.inverse_residual == pytest.approx(float(want_inverse), rel=1e-3)
    assert report.hvps == len(B) * (steps + (1 if normal else 0))


class DenseSource(Dense):
    """A Dense matrix that also offers what the curvature cache needs (msif.influence.curvature.CurvatureSource)."""

    def __init__(self, A: torch.Tensor):
        super().__init__(A)
        self.point, self.cache_dir, self.ritz_pairs = A[0], None, {}

    def fingerprint(self) -> str:
        return "dense"


@pytest.mark.parametrize("normal", [True, False])
def test_relative_damping_damps_below_a_fraction_of_the_largest_eigenvalue(normal):
    """relative_damping ρ: λ = (ρ·|λ|max)² for the paper's system, ρ·|λ|max for (H + λI) x = b, with |λ|max from
    the explicit matrix's eigenvalues (here 10); the solve is then the dense filter at that λ."""
    p, rho = 80, 0.03
    A = indefinite(p)
    top = float(torch.linalg.eigvalsh(A).abs().max())
    lam = (rho * top) ** 2 if normal else rho * top
    B = torch.randn(3, p, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    eye = torch.eye(p, dtype=torch.float64)
    want = (torch.linalg.solve(A @ A + lam * eye, A @ B.T) if normal else torch.linalg.solve(A + lam * eye, B.T)).T
    spec = {"method": "lanczos", "damping": 123.0, "relative_damping": rho, "iterations": 500, "tol": 1e-14}
    X, report = solve(DenseSource(A), B, spec | {"normal": normal}, "t")
    assert report.largest_eigenvalue == pytest.approx(top, rel=1e-9)
    assert report.damping == pytest.approx(lam, rel=1e-8) and report.relative_damping == rho
    assert float((X - want).norm() / want.norm()) < 1e-8
    dense, _ = solve(DenseSource(A), B, {"method": "exact", "relative_damping": rho, "normal": normal}, "t")
    assert float((dense - want).norm() / want.norm()) < 1e-8


def test_a_non_positive_relative_damping_is_refused_with_its_name():
    from msif.errors import SolverError

    with pytest.raises(SolverError, match="relative_damping"):
        solve(
            DenseSource(indefinite(10)),
            torch.ones(1, 10, dtype=torch.float64),
            {"method": "cg", "relative_damping": 0},
            "t",
        )


@pytest.mark.parametrize("method", ["lanczos", "exact"])
def test_the_retrain_response_is_k_steps_of_gradient_descent_on_the_quadratic(method):
    """x = (I − (I − ηH)^K) H⁻¹ b is where K steps of gradient descent at rate η on ½xᵀHx − bᵀx take x from 0,
    negative curvature included: checked against those K steps, run here."""
    p, lr, steps = 60, 0.05, 40
    A = indefinite(p, seed=4)
    B = torch.randn(3, p, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    want = torch.zeros_like(B)
    for _ in range(steps):
        want = want - lr * (want @ A - B)
    spec = {"method": method, "retrain_lr": lr, "retrain_steps": steps, "tol": 1e-13}
    X, report = solve(Dense(A), B, spec | ({"iterations": 100} if method == "lanczos" else {}), "t")
    assert float((X - want).norm() / want.norm()) < 1e-10
    assert report.damping == 0.0 and report.retrain == (lr, steps)
    assert report.system == "x = (I − (I − 0.05·H)^40) H⁻¹ b"
    assert report.residual < 1e-9
    if method == "lanczos":  # a polynomial of degree K − 1: exact once the Krylov space has K + 1 vectors
        assert report.iterations <= steps + 1


def test_the_retrain_filter_runs_from_eta_k_at_zero_curvature_to_the_inverse_at_large():
    from msif.influence.curvature import retrain_filter

    lr, steps = 0.01, 50
    theta = torch.tensor([0.0, 1e-12, 1e-6, 1e4], dtype=torch.float64)
    f = retrain_filter(theta, lr, steps)
    assert f[0] == pytest.approx(lr * steps, rel=1e-15)
    # the series η K − η² K (K − 1) θ / 2 for small θ: no cancellation where ηθ is tiny
    for t, v in zip(theta[1:3], f[1:3], strict=True):
        assert float(v) == pytest.approx(lr * steps - lr * lr * steps * (steps - 1) * float(t) / 2, rel=1e-12)
    big = retrain_filter(torch.tensor([2.0], dtype=torch.float64), 0.5, 200)
    assert float(big) == pytest.approx(1 / 2.0, rel=1e-12)  # ηθ = 1: one step lands on θ⁻¹ b and stays
    assert float(f[3]) == pytest.approx(((1 - (1 - 100.0) ** 50) / 1e4), rel=1e-12)  # ηθ > 2: the diverging steps


def test_the_retrain_rate_and_steps_come_together_and_are_checked():
    from msif.errors import SolverError
    from msif.influence.settings import solver_settings

    with pytest.raises(SolverError, match="retrain_steps"):
        solver_settings({"method": "lanczos", "retrain_lr": 0.1}, "pretrain")
    with pytest.raises(SolverError, match="retrain_lr"):
        solver_settings({"method": "exact", "retrain_lr": -1.0, "retrain_steps": 3}, "pretrain")
    with pytest.raises(SolverError, match="has no setting 'retrain_lr'"):
        solver_settings({"method": "cg_normal", "retrain_lr": 0.1, "retrain_steps": 3}, "pretrain")


def test_target_subspace_is_exact_once_it_spans_the_targets_krylov_space():
    """Rank-8 Ritz pairs miss most of a spread-out spectrum; adding Krylov blocks of the targets' remainder gives the
    exact filter on those targets once the space holds their whole Krylov space, at block × steps HVPs and never
    more directions than there are parameters. (On such a spectrum the Galerkin error is not monotone in the steps:
    the filter t / (t² + λ) changes sign at 0, which no low-degree polynomial follows.)"""
    from msif.influence.curvature import fit_ritz, target_subspace

    p, lam = 80, 0.01
    A = indefinite(p, seed=11)
    B = torch.randn(3, p, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    want = torch.linalg.solve(A @ A + lam * torch.eye(p, dtype=torch.float64), A @ B.T).T
    H = DenseWithPoint(A)
    curv = fit_ritz(H, rank=8, seed=0)
    assert float((curv.apply(B, lam, True) - want).norm() / want.norm()) > 0.5  # lowrank alone is far off
    calls = H.calls
    sub = target_subspace(H, curv, B, block=3, steps=30)
    assert H.calls - calls == sub.hvps < 1 + 4 * 30 and len(sub.values) == p  # the space filled before step 30
    assert float((sub.apply(B, lam, True) - want).norm() / want.norm()) < 1e-10


def test_target_subspace_needs_few_steps_when_the_remainder_is_a_flat_bulk():
    """The shape of a network's Hessian: a few large eigenvalues (taken by the Ritz pairs) and a bulk near zero. On
    the bulk the filter is smooth, so four blocks of the targets' remainder already give it to 1e-3 (each step cuts
    the error about tenfold), where the Ritz pairs alone are off by the bulk's whole share."""
    from msif.influence.curvature import fit_ritz, target_subspace

    p, lam = 300, 0.01
    g = torch.Generator().manual_seed(15)
    Q, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))
    eigs = torch.rand(p, generator=g, dtype=torch.float64) * 0.03
    eigs[:6] = torch.tensor([-0.5, 2.0, 3.0, 5.0, 8.0, 12.0], dtype=torch.float64)
    A = (Q * eigs) @ Q.T
    B = torch.randn(5, p, generator=g, dtype=torch.float64)
    want = torch.linalg.solve(A @ A + lam * torch.eye(p, dtype=torch.float64), A @ B.T).T
    H = DenseWithPoint(A)
    curv = fit_ritz(H, rank=10, seed=0)
    plain = float((curv.apply(B, lam, True) - want).norm() / want.norm())
    sub = target_subspace(H, curv, B, block=5, steps=4)
    err = float((sub.apply(B, lam, True) - want).norm() / want.norm())
    assert plain > 0.5 and err < 1e-3 and sub.hvps == 1 + 6 * 4  # the leak direction, then 5 + 1 per step


def test_target_subspace_for_targets_inside_the_ritz_space_grows_only_the_leak_direction():
    """Targets in span(U) have no remainder: the block is just the direction in which H U leaves span(U), one HVP
    per step, and the answer moves towards the exact filter."""
    from msif.influence.curvature import fit_ritz, target_subspace

    p, lam = 50, 0.01
    A = indefinite(p, seed=13)
    H = DenseWithPoint(A)
    curv = fit_ritz(H, rank=10, seed=0)
    B = torch.randn(2, 10, generator=torch.Generator().manual_seed(14), dtype=torch.float64) @ curv.vectors
    want = torch.linalg.solve(A @ A + lam * torch.eye(p, dtype=torch.float64), A @ B.T).T
    calls = H.calls
    sub = target_subspace(H, curv, B, block=4, steps=3)
    assert H.calls - calls == 1 + 3 and len(sub.values) == 13
    err = float((sub.apply(B, lam, True) - want).norm() / want.norm())
    assert err < float((curv.apply(B, lam, True) - want).norm() / want.norm())
