"""The influence mathematics checked against independent computations (MATH.md).

* Exactness: msif's scores on a tiny float64 network equal a computation written here with explicit Hessians
  (torch.func.hessian + torch.linalg.solve on a hand-written forward pass), for both finetune cases.
* Solvers: cg, cg_normal and lissa agree with the dense solve of the same system.
* Finite differences: upweighting a pretraining example by ε and re-solving both stages to optimality (L-BFGS,
  float64, L2 regularisation equal to the damping) moves L_T by I(z, T)·ε.
* Limits, the identity ablation, and per-test scores summing to the aggregated target.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import hessian, jacrev

from msif.influence import MultiStageInfluence, default_solver
from msif.models import TwoStageNet
from tests.helpers.numerics import minimize

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

DX, DE, K_PRE, K_FIN = 4, 5, 3, 3


# ---------------------------------------------------------------------------------------------------------------
# A tiny problem: data, a hand-written forward pass, and the same network as msif modules.


def make_data(seed=0, m=48, n=40, t=12):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(K_PRE + K_FIN, DX, generator=g) * 1.5

    def draw(count, classes):
        y = torch.randint(0, len(classes), (count,), generator=g)
        x = centres[torch.tensor(classes)[y]] + torch.randn(count, DX, generator=g)
        return x, y

    pre = draw(m, [0, 1, 2])
    fin = draw(n, [3, 4, 5])
    test = draw(t, [3, 4, 5])
    return pre, fin, test


def unpack(theta: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A flat vector -> (weight (rows, cols), bias (rows,)), in this test's own order."""
    return theta[: rows * cols].view(rows, cols), theta[rows * cols :]


N_W, N_HEAD = DE * DX + DE, K_PRE * DE + K_PRE


def logits(w: torch.Tensor, head: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    A, a = unpack(w, DE, DX)
    B, b = unpack(head, K_PRE, DE)
    return torch.tanh(x @ A.T + a) @ B.T + b


def nets_from(w, u, theta) -> tuple[TwoStageNet, TwoStageNet]:
    """msif modules holding the given flat parameters (embedding W, pretrain head U, finetune head Θ)."""

    def linear(vec, rows, cols):
        layer = nn.Linear(cols, rows)
        W_, b_ = unpack(vec.detach().clone(), rows, cols)
        layer.weight.data, layer.bias.data = W_.clone(), b_.clone()
        return layer

    pre = TwoStageNet(nn.Sequential(linear(w, DE, DX), nn.Tanh()), linear(u, K_PRE, DE))
    return pre, TwoStageNet(nn.Sequential(linear(w, DE, DX), nn.Tanh()), linear(theta, K_FIN, DE))


def ce(w, head, x, y):
    return F.cross_entropy(logits(w, head, x), y)


class Problem:
    """Both stages trained to a tight optimum of CE + (μ/2)‖·‖² (μ = the dampings), optionally with z upweighted."""

    def __init__(self, case: str, alpha: float = 0.05, mu_pre: float = 0.05, mu_fin: float = 0.05, seed: int = 0):
        (self.xp, self.yp), (self.xf, self.yf), (self.xt, self.yt) = make_data(seed)
        self.case, self.alpha, self.mu_pre, self.mu_fin = case, alpha, mu_pre, mu_fin
        g = torch.Generator().manual_seed(seed + 1)
        self.w0 = torch.randn(N_W, generator=g) * 0.5
        self.u0 = torch.randn(N_HEAD, generator=g) * 0.5
        self.t0 = torch.randn(N_HEAD, generator=g) * 0.5
        self.w, self.u = self.pretrain(self.w0, self.u0)
        self.wf, self.theta = self.finetune(self.w, self.w, self.t0)

    def pretrain(self, w0, u0, z: int | None = None, eps: float = 0.0):
        def objective(wu):
            w, u = wu[:N_W], wu[N_W:]
            loss = ce(w, u, self.xp, self.yp) + self.mu_pre / 2 * wu.pow(2).sum()
            if z is not None:
                loss = loss + eps * F.cross_entropy(logits(w, u, self.xp[z : z + 1]), self.yp[z : z + 1])
            return loss

        wu = minimize(objective, torch.cat([w0, u0]))
        return wu[:N_W], wu[N_W:]

    def finetune(self, w_bar, w0, t0):
        if self.case == "fixed":
            theta = minimize(lambda t: ce(w_bar, t, self.xf, self.yf) + self.mu_fin / 2 * t.pow(2).sum(), t0)
            return w_bar, theta

        def objective(wt):
            w, t = wt[:N_W], wt[N_W:]
            return (
                ce(w, t, self.xf, self.yf) + self.alpha * (w - w_bar).pow(2).sum() + self.mu_fin / 2 * wt.pow(2).sum()
            )

        wt = minimize(objective, torch.cat([w0, t0]))
        return wt[:N_W], wt[N_W:]

    def test_loss_after_upweighting(self, z: int, eps: float) -> float:
        w, u = self.pretrain(self.w, self.u, z, eps)
        wf, theta = self.finetune(w, self.wf, self.theta)
        return float(F.cross_entropy(logits(wf, theta, self.xt), self.yt, reduction="sum"))

    def msif(self, solver: dict, alpha: float | None = None) -> MultiStageInfluence:
        pre, _ = nets_from(self.w, self.u, self.theta)
        _, fin = nets_from(self.wf, self.u, self.theta)
        return MultiStageInfluence(
            pre,
            fin,
            (self.xp, self.yp),
            (self.xf, self.yf),
            case=self.case,
            alpha=self.alpha if alpha is None else alpha,
            solver=solver,
            hessian_sample=None,
            batch_size=64,
        )


def exact(mu_pre, mu_fin, normal=False, **kw):
    """The dense solve; of (H + λI) x = b unless normal (the default solver's and `exact`'s own default system)."""
    return default_solver("exact", pretrain_damping=mu_pre, finetune_damping=mu_fin, normal=normal, **kw)


# ---------------------------------------------------------------------------------------------------------------
# The independent computation: explicit Hessians of hand-written losses, dense solves.


def explicit_scores(
    p: Problem, case: str, alpha: float, lam_pre: float, lam_fin: float, identity: bool = False, normal: bool = False
) -> torch.Tensor:
    def G(wu):
        return ce(wu[:N_W], wu[N_W:], p.xp, p.yp)

    def Fn(wt):
        return ce(wt[:N_W], wt[N_W:], p.xf, p.yf)

    def LT(wt):
        return F.cross_entropy(logits(wt[:N_W], wt[N_W:], p.xt), p.yt, reduction="sum")

    def per_example(wu):
        return F.cross_entropy(logits(wu[:N_W], wu[N_W:], p.xp), p.yp, reduction="none")

    def inv(H, b, lam):
        if identity:
            return b
        eye = torch.eye(len(H))
        if normal:
            return torch.linalg.solve(H @ H + lam * eye, H @ b)
        return torch.linalg.solve(H + lam * eye, b)

    wu = torch.cat([p.w, p.u])
    wt = torch.cat([p.wf, p.theta])
    v = torch.autograd.functional.jacobian(LT, wt)
    HF = hessian(Fn)(wt)
    if case == "fixed":
        v_W, v_T = v[:N_W], v[N_W:]
        a = inv(HF[N_W:, N_W:], v_T, lam_fin)
        u = v_W - HF[N_W:, :N_W].T @ a
        rhs = torch.cat([u, torch.zeros(N_HEAD)])
    else:
        P = torch.diag(torch.cat([torch.ones(N_W), torch.zeros(N_HEAD)]))
        a = v if identity else inv(HF + 2 * alpha * P, v, lam_fin)
        rhs = torch.cat([2 * alpha * a[:N_W], torch.zeros(N_HEAD)])
    s = inv(hessian(G)(wu), rhs, lam_pre)
    grads = jacrev(per_example)(wu)  # (m, p)
    return -(grads @ s)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def float64():
    """Every tensor of this module in float64 (restored afterwards, so other test modules are unaffected)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(scope="module", params=["fixed", "updated"])
def problem(request, float64) -> Problem:
    return Problem(request.param)


def test_exact_solver_matches_explicit_hessians(problem):
    for lam_pre, lam_fin in [(0.02, 0.02), (1e-3, 1e-4)]:
        ours = problem.msif(exact(lam_pre, lam_fin)).influence(problem.xt, problem.yt)
        theirs = explicit_scores(problem, problem.case, problem.alpha, lam_pre, lam_fin)
        assert rel(ours, theirs) < 1e-6


def test_cg_normal_and_exact_normal_match_the_papers_regularised_system(problem):
    theirs = explicit_scores(problem, problem.case, problem.alpha, 1e-3, 1e-4, normal=True)
    dense = problem.msif(exact(1e-3, 1e-4, normal=True)).influence(problem.xt, problem.yt)
    cg = problem.msif(default_solver("cg_normal", 1e-3, 1e-4, iterations=500, tol=1e-12))
    assert rel(dense, theirs) < 1e-6
    assert rel(cg.influence(problem.xt, problem.yt), theirs) < 1e-6
    assert all(r.converged for r in cg.trace.solves)


def test_lanczos_matches_explicit_hessians_for_both_filters(problem):
    """Lanczos applies f(T) in the Krylov basis: (H² + λI)⁻¹H by default, (H + λI)⁻¹ with normal=false."""
    papers = explicit_scores(problem, problem.case, problem.alpha, 1e-3, 1e-4, normal=True)
    lz = problem.msif(default_solver("lanczos", 1e-3, 1e-4, iterations=200, tol=1e-13))
    assert rel(lz.influence(problem.xt, problem.yt), papers) < 1e-6
    plain = explicit_scores(problem, problem.case, problem.alpha, 0.02, 0.02)
    lz = problem.msif(default_solver("lanczos", 0.02, 0.02, iterations=200, tol=1e-13, normal=False))
    assert rel(lz.influence(problem.xt, problem.yt), plain) < 1e-6


def test_exact_by_default_solves_the_default_solvers_system_and_says_which(problem):
    """`solver=exact` is the check of the default: the same (H² + λI) x = H b, named in every solve report."""
    dense = problem.msif(default_solver("exact", 1e-3, 1e-4))
    lz = problem.msif(default_solver("lanczos", 1e-3, 1e-4, iterations=200, tol=1e-13))
    assert rel(dense.influence(problem.xt, problem.yt), lz.influence(problem.xt, problem.yt)) < 1e-6
    assert {r.system for r in dense.trace.solves} == {r.system for r in lz.trace.solves} == {"(H² + λI) x = H b"}
    plain = problem.msif(exact(0.02, 0.02))
    plain.influence(problem.xt, problem.yt)
    assert {r.system for r in plain.trace.solves} == {"(H + λI) x = b"}


def test_cg_and_lissa_agree_with_exact_on_the_same_system(problem):
    reference = problem.msif(exact(0.02, 0.02)).influence(problem.xt, problem.yt)
    cg = problem.msif(default_solver("cg", 0.02, 0.02, iterations=500, tol=1e-12)).influence(problem.xt, problem.yt)
    assert rel(cg, reference) < 1e-6
    # LiSSA converges at rate 1 − λ_min/scale per term: give it a well-conditioned system (damping 0.2).
    reference = problem.msif(exact(0.2, 0.2)).influence(problem.xt, problem.yt)
    lissa = problem.msif(default_solver("lissa", 0.2, 0.2, depth=1000, scale="auto", tol=1e-6))
    assert rel(lissa.influence(problem.xt, problem.yt), reference) < 1e-4  # a truncated series: looser


@pytest.mark.parametrize("z", [0, 7, 30])
def test_finite_differences_of_the_retrained_test_loss_match_the_score(problem, z):
    """dL_T/dε at ε = 0, by central differences over full re-solves of both stages, vs I(z, T)."""
    score = problem.msif(exact(problem.mu_pre, problem.mu_fin)).influence(problem.xt, problem.yt)[z]
    h = 1e-5  # both stages are re-solved to machine precision (Newton-polished), so a small step is safe
    fd = (problem.test_loss_after_upweighting(z, h) - problem.test_loss_after_upweighting(z, -h)) / (2 * h)
    assert abs(fd - float(score)) <= 1e-6 * abs(fd), (fd, float(score))  # the issue asks for 1e-3


def test_the_problem_is_at_a_strict_minimum(problem):
    """The finite-difference test's premise: both stages stationary, with positive definite Hessians."""

    def G(wu):
        return ce(wu[:N_W], wu[N_W:], problem.xp, problem.yp) + problem.mu_pre / 2 * wu.pow(2).sum()

    wu = torch.cat([problem.w, problem.u])
    assert torch.func.grad(G)(wu).norm() < 1e-12
    assert torch.linalg.eigvalsh(hessian(G)(wu)).min() > 1e-3


def test_identity_solver_is_the_formula_with_every_inverse_replaced_by_identity(problem):
    ours = problem.msif(default_solver("identity")).influence(problem.xt, problem.yt)
    theirs = explicit_scores(problem, problem.case, problem.alpha, 0.0, 0.0, identity=True)
    assert rel(ours, theirs) < 1e-10


def test_per_test_scores_sum_to_the_aggregated_target(problem):
    msi = problem.msif(exact(0.02, 0.02))
    per_test = msi.influence(problem.xt, problem.yt, per_test=True)
    assert per_test.shape == (len(problem.yp), len(problem.yt))
    aggregated = msi.influence(problem.xt, problem.yt)
    assert rel(per_test.sum(1), aggregated) < 1e-10
    one = msi.influence(problem.xt[3:4], problem.yt[3:4])
    assert rel(per_test[:, 3], one) < 1e-10


def test_case_updated_vanishes_as_alpha_goes_to_zero_and_becomes_case_fixed_as_alpha_grows():
    fixed = Problem("fixed")
    ref = fixed.msif(exact(0.02, 0.02)).influence(fixed.xt, fixed.yt)
    same_point = Problem("fixed")
    same_point.case = "updated"  # the same parameters (W = W*), scored with the case-updated formula
    small = same_point.msif(exact(0.02, 0.02), alpha=1e-9).influence(fixed.xt, fixed.yt)
    assert float(small.norm()) < 1e-7 * float(ref.norm())
    large = same_point.msif(exact(0.02, 0.02), alpha=1e8).influence(fixed.xt, fixed.yt)
    assert rel(large, ref) < 1e-6


def test_scores_are_signed_as_in_math_md():
    """Positive I = harmful: removing the top-scored example lowers the retrained test loss, as −I/m predicts."""
    p = Problem("fixed")
    scores = p.msif(exact(p.mu_pre, p.mu_fin)).influence(p.xt, p.yt)
    z = int(scores.argmax())
    m = len(p.yp)
    base = p.test_loss_after_upweighting(z, 0.0)
    removed = p.test_loss_after_upweighting(z, -1.0 / m)  # ε = −1/m: z removed from the mean
    assert scores[z] > 0 and removed < base
    predicted = -float(scores[z]) / m  # first order in ε = −1/m, a large step on 48 examples: same sign and size
    assert 0.5 < (removed - base) / predicted < 2.0


def test_many_targets_through_the_pretrain_basis_give_the_explicit_per_test_scores(problem):
    """`lowrank` on H_G with too few Ritz pairs, grown by Krylov blocks of the targets' remainder until the space is
    whole: the 52 per-test scores are the explicit Hessians', though the examples are scored against the basis
    vectors and combined (fewer basis vectors than targets), and they sum to the summed target's explicit score."""
    x_T, y_T = torch.cat([problem.xf, problem.xt]), torch.cat([problem.yf, problem.yt])
    lowrank = {"method": "lowrank", "damping": 0.02, "normal": False, "rank": 4, "block": 4, "steps": 12}
    msi = problem.msif({"pretrain": lowrank, "finetune": exact(0.02, 0.02)["finetune"]})
    scores = msi.influence(x_T, y_T, per_test=True)
    coefficients, basis = msi.trace.solves[-1].factors
    assert len(basis) < len(y_T) == 52  # scored as the basis vectors, not as the 52 targets
    dense = problem.msif(exact(0.02, 0.02)).influence(x_T, y_T, per_test=True)
    assert rel(scores, dense) < 1e-8
    theirs = explicit_scores(problem, problem.case, problem.alpha, 0.02, 0.02)  # the summed target: problem.xt
    assert rel(scores[:, len(problem.yf) :].sum(1), theirs) < 1e-8
