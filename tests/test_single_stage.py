"""Single-stage (Koh & Liang) influence against an explicit Hessian and finite differences of re-solved training.

Softmax regression with weight decay μ, trained to machine precision in float64: the Hessian of the regularised
objective is H_CE + μI, so the `exact` solver with damping μ gives the exact first-order effect of upweighting z.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, hessian

from msif.influence import SingleStageInfluence
from tests.helpers.numerics import minimize

MU = 0.05
D, C = 5, 3


def logits(theta, x):
    return x @ theta[: D * C].view(C, D).T + theta[D * C :]


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    x, x_T = torch.randn(60, D, dtype=torch.float64), torch.randn(20, D, dtype=torch.float64)
    w = torch.randn(C, D, dtype=torch.float64)
    y, y_T = (x @ w.T + 0.7 * torch.randn(60, C, dtype=torch.float64)).argmax(1), (x_T @ w.T).argmax(1)

    def objective(theta, eps=0.0, z=None):
        loss = F.cross_entropy(logits(theta, x), y) + MU / 2 * (theta**2).sum()
        if z is not None:
            loss = loss + eps * F.cross_entropy(logits(theta, x[z : z + 1]), y[z : z + 1])
        return loss

    theta = minimize(objective, torch.zeros(D * C + C, dtype=torch.float64))
    net = nn.Linear(D, C).double()
    with torch.no_grad():
        net.weight.copy_(theta[: D * C].view(C, D))
        net.bias.copy_(theta[D * C :])
    return x, y, x_T, y_T, theta, objective, net


def test_scores_match_the_explicit_hessian_formula(problem):
    x, y, x_T, y_T, theta, objective, net = problem
    ssi = SingleStageInfluence(
        net, (x, y), solver={"method": "exact", "damping": MU, "normal": False}, hessian_sample=None
    )
    scores = ssi.influence(x_T, y_T)
    H = hessian(objective)(theta)
    s = torch.linalg.solve(H, grad(lambda t: F.cross_entropy(logits(t, x_T), y_T, reduction="sum"))(theta))
    per_example = torch.stack(
        [grad(lambda t, i=i: F.cross_entropy(logits(t, x[i : i + 1]), y[i : i + 1]))(theta) for i in range(len(y))]
    )
    expected = -(per_example @ s)
    assert torch.allclose(scores, expected, rtol=1e-8, atol=1e-10 * expected.abs().max())


@pytest.mark.parametrize("z", [0, 17, 42])
def test_scores_are_the_derivative_of_the_retrained_test_loss(problem, z):
    x, y, x_T, y_T, theta, objective, net = problem
    ssi = SingleStageInfluence(
        net, (x, y), solver={"method": "exact", "damping": MU, "normal": False}, hessian_sample=None
    )
    score = float(ssi.influence(x_T, y_T, indices=torch.tensor([z]))[0])
    eps = 1e-4

    def test_loss_at(e):
        t = minimize(lambda th: objective(th, e, z), theta)
        return float(F.cross_entropy(logits(t, x_T), y_T, reduction="sum"))

    finite = (test_loss_at(eps) - test_loss_at(-eps)) / (2 * eps)
    assert score == pytest.approx(finite, rel=1e-5, abs=1e-8)


def test_per_test_scores_sum_to_the_summed_target_and_cg_normal_agrees_with_exact(problem):
    x, y, x_T, y_T, theta, objective, net = problem
    exact = SingleStageInfluence(net, (x, y), solver={"method": "exact", "damping": MU, "normal": True})
    cg = SingleStageInfluence(
        net, (x, y), solver={"method": "cg_normal", "damping": MU, "iterations": 200, "tol": 1e-12}
    )
    per_test = cg.influence(x_T, y_T, per_test=True)
    assert per_test.shape == (60, 20)
    assert torch.allclose(per_test.sum(1), cg.influence(x_T, y_T), rtol=1e-8, atol=1e-10)
    assert torch.allclose(cg.influence(x_T, y_T), exact.influence(x_T, y_T), rtol=1e-6, atol=1e-9)


def test_msif_influence_mode_single_stage_scores_the_pretrained_network_on_its_own_test_set(env):
    from msif.lifecycle import Context
    from msif.stages import influence
    from msif.stages.pretrain import pretrained
    from tests.helpers.configs import compose_cfg

    overrides = ["dataset=tiny", "dtype=float64", "solver=exact", "response.kind=inverse", "mode=single_stage"]
    result = influence(compose_cfg("influence", overrides))
    assert result.path.name.startswith("influence-single-") and result.path.parent.name.startswith("pretrain-")
    assert result.summary["mode"] == "single_stage" and result.summary["finetune_run"] is None
    cfg = compose_cfg("influence", overrides)
    s = Context(cfg)
    pre = pretrained(cfg, s)
    test = s.tasks(cfg).pretrain.test
    assert result.summary["target"]["size"] == len(test)
    direct = SingleStageInfluence(
        pre.net, s.tasks(cfg).pretrain.train, solver={"method": "exact", "relative_damping": 0.1}, hessian_sample=None
    ).influence(test.x, test.y)
    assert torch.allclose(torch.tensor(result.scores["score"].to_numpy()), direct, rtol=1e-10, atol=1e-12)
    multi = influence(compose_cfg("influence", overrides[:-1]))
    assert multi.path.parent.name.startswith("finetune-")


@pytest.mark.parametrize("stage", ["validate-loo", "cleanse"])
def test_multi_stage_only_stages_refuse_single_stage_mode(env, stage):
    from msif.errors import MsifError
    from msif.stages import cleanse, validate_loo
    from tests.helpers.configs import compose_cfg

    fn = validate_loo if stage == "validate-loo" else cleanse
    with pytest.raises(MsifError, match="mode=single_stage"):
        fn(compose_cfg(stage, ["dataset=tiny", "mode=single_stage"]))


@pytest.mark.parametrize("method", ["jvp", "per_example", "auto"])
def test_every_scoring_method_gives_the_explicit_per_test_scores(problem, method):
    x, y, x_T, y_T, theta, objective, net = problem
    ssi = SingleStageInfluence(
        net,
        (x, y),
        solver={"method": "exact", "damping": MU, "normal": False},
        hessian_sample=None,
        batch_size=16,
        score_method=method,
    )
    scores = ssi.influence(x_T[:7], y_T[:7], per_test=True)
    H = hessian(objective)(theta)
    per_example = torch.stack(
        [grad(lambda t, i=i: F.cross_entropy(logits(t, x[i : i + 1]), y[i : i + 1]))(theta) for i in range(len(y))]
    )
    targets = torch.stack(
        [grad(lambda t, k=k: F.cross_entropy(logits(t, x_T[k : k + 1]), y_T[k : k + 1]))(theta) for k in range(7)]
    )
    expected = -(per_example @ torch.linalg.solve(H, targets.T))
    assert torch.allclose(scores, expected, rtol=1e-8, atol=1e-10 * expected.abs().max())
    assert ssi.trace.scoring["method"] in ("jvp", "per_example")
    if method == "auto":
        assert set(ssi.trace.scoring["measured_seconds"]) == {"jvp", "per_example"}


def test_jvp_in_direction_chunks_and_auto_above_its_measuring_limit(problem, monkeypatch):
    """Forward-mode scoring of K targets runs JVP_CHUNK directions and JVP_ROWS examples at a time (bounded memory)
    with the same numbers;
    above AUTO_MEASURE_MAX_K targets `auto` takes per-example gradients without trying jvp."""
    from msif.influence import scoring

    x, y, x_T, y_T, theta, objective, net = problem

    def scores(method):
        ssi = SingleStageInfluence(
            net, (x, y), solver={"method": "exact", "damping": MU}, hessian_sample=None, batch_size=16,
            score_method=method,
        )  # fmt: skip
        return ssi.influence(x_T[:7], y_T[:7], per_test=True), ssi.trace.scoring

    whole, _ = scores("jvp")
    monkeypatch.setattr(scoring, "JVP_CHUNK", 3)
    monkeypatch.setattr(scoring, "JVP_ROWS", 5)  # batches of 16 in passes of 5, 5, 5 and 1 rows
    monkeypatch.setattr(scoring, "AUTO_MEASURE_MAX_K", 5)
    chunked, _ = scores("jvp")
    assert torch.allclose(chunked, whole, rtol=1e-12, atol=1e-14 * whole.abs().max())
    _, chosen = scores("auto")
    assert chosen["method"] == "per_example" and "measured_seconds" not in chosen


def test_many_targets_through_the_target_subspace_give_the_explicit_per_test_scores(problem):
    """`lowrank` with too few Ritz pairs, grown by Krylov blocks of the targets' remainder until the space is whole:
    the per-test scores are the explicit Hessian's, though the 20 test points are scored as the basis vectors and
    combined (fewer basis vectors than targets)."""
    x, y, x_T, y_T, theta, objective, net = problem
    solver = {"method": "lowrank", "damping": MU, "normal": False, "rank": 4, "block": 3, "steps": 6}
    ssi = SingleStageInfluence(net, (x, y), solver=solver, hessian_sample=None)
    scores = ssi.influence(x_T, y_T, per_test=True)
    coefficients, basis = ssi.trace.solves[-1].factors
    # the softmax's shift invariance leaves H a null space that no gradient reaches: the space stops below 18
    assert len(basis) < D * C + C < len(y_T)  # scored as the basis vectors, not as the 20 targets
    H = hessian(objective)(theta)
    G_T = torch.stack(
        [grad(lambda t, i=i: F.cross_entropy(logits(t, x_T[i : i + 1]), y_T[i : i + 1]))(theta) for i in range(20)]
    )
    per_example = torch.stack(
        [grad(lambda t, i=i: F.cross_entropy(logits(t, x[i : i + 1]), y[i : i + 1]))(theta) for i in range(len(y))]
    )
    expected = -(per_example @ torch.linalg.solve(H, G_T.T))
    assert torch.allclose(scores, expected, rtol=1e-7, atol=1e-9 * expected.abs().max())
