"""Networks with batch norm and dropout: trained in train mode, evaluated and scored in eval mode (running statistics
frozen, dropout off), the function whose Hessian msif differentiates.

The scores of a batch-norm network are checked against explicit Hessians of a hand-written eval-mode forward pass
(running statistics as constants), for both finetune cases.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.func import hessian, jacrev

from msif.influence import MultiStageInfluence, default_solver
from msif.models import TwoStageNet, build_pretrain_net
from msif.training import evaluate, fit

DX, DE, K = 4, 5, 3
N_W = DE * DX + 3 * DE  # linear weight and bias, batch-norm weight and bias
N_HEAD = K * DE + K
EPS = 1e-5

pytestmark = pytest.mark.usefixtures("float64")  # every tensor of this module in float64 (conftest.py)


def embedding() -> nn.Module:
    return nn.Sequential(nn.Linear(DX, DE), nn.BatchNorm1d(DE, eps=EPS), nn.Tanh(), nn.Dropout(0.3))


def data(seed: int, count: int, offset: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(2 * K, DX, generator=g) * 1.5
    y = torch.randint(0, K, (count,), generator=g)
    return centres[y + offset] + torch.randn(count, DX, generator=g), y


def train(net: nn.Module, x, y, steps: int, params=None) -> None:
    """Plain SGD in train mode (batch statistics, dropout on): the running statistics move away from 0 / 1."""
    opt = torch.optim.SGD(params or net.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(steps):
        idx = torch.randperm(len(y), generator=gen)[:16]
        opt.zero_grad()
        F.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
    net.eval()


def forward(w: torch.Tensor, head: torch.Tensor, x: torch.Tensor, stats) -> torch.Tensor:
    """The eval-mode network written out: BN divides by the running statistics, dropout is the identity."""
    mean, var = stats
    A, a = w[: DE * DX].view(DE, DX), w[DE * DX : DE * DX + DE]
    gamma, beta = w[DE * DX + DE : DE * DX + 2 * DE], w[DE * DX + 2 * DE :]
    B, b = head[: K * DE].view(K, DE), head[K * DE :]
    h = (x @ A.T + a - mean) / torch.sqrt(var + EPS) * gamma + beta
    return torch.tanh(h) @ B.T + b


def flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def stats(net: TwoStageNet):
    bn = net.embedding[1]
    return bn.running_mean.clone(), bn.running_var.clone()


@pytest.mark.parametrize("case", ["fixed", "updated"])
def test_batchnorm_scores_match_explicit_hessians_of_the_eval_mode_loss(case):
    torch.manual_seed(0)
    (xp, yp), (xf, yf), (xt, yt) = data(0, 48, 0), data(1, 40, K), data(2, 12, K)
    pre = TwoStageNet(embedding(), nn.Linear(DE, K))
    train(pre, xp, yp, 40)
    fin = TwoStageNet(copy.deepcopy(pre.embedding), nn.Linear(DE, K))
    alpha, lam = 0.05, 0.05
    if case == "fixed":
        train(fin, xf, yf, 40, params=fin.head.parameters())  # W frozen: the running statistics move anyway
        fin.embedding.load_state_dict(pre.embedding.state_dict())
    else:
        train(fin, xf, yf, 40)
    assert not torch.allclose(stats(pre)[0], torch.zeros(DE)), "the running statistics must be non-trivial"

    ours = MultiStageInfluence(
        pre,
        fin,
        (xp, yp),
        (xf, yf),
        case=case,
        alpha=alpha,
        solver=default_solver("exact", pretrain_damping=lam, finetune_damping=lam, normal=False),
        hessian_sample=None,
        batch_size=16,
    ).influence(xt, yt)

    pre_stats, fin_stats = stats(pre), stats(fin)
    wu = torch.cat([flat(pre.embedding), flat(pre.head)])
    wt = torch.cat([flat(fin.embedding), flat(fin.head)])

    def G(v):
        return F.cross_entropy(forward(v[:N_W], v[N_W:], xp, pre_stats), yp)

    def Fn(v):
        return F.cross_entropy(forward(v[:N_W], v[N_W:], xf, fin_stats), yf)

    def LT(v):
        return F.cross_entropy(forward(v[:N_W], v[N_W:], xt, fin_stats), yt, reduction="sum")

    def per_example(v):
        return F.cross_entropy(forward(v[:N_W], v[N_W:], xp, pre_stats), yp, reduction="none")

    def inv(H, b):
        return torch.linalg.solve(H + lam * torch.eye(len(H)), b)

    v = torch.autograd.functional.jacobian(LT, wt)
    HF = hessian(Fn)(wt)
    if case == "fixed":
        a = inv(HF[N_W:, N_W:], v[N_W:])
        rhs = torch.cat([v[:N_W] - HF[N_W:, :N_W].T @ a, torch.zeros(N_HEAD)])
    else:
        P = torch.diag(torch.cat([torch.ones(N_W), torch.zeros(N_HEAD)]))
        a = inv(HF + 2 * alpha * P, v)
        rhs = torch.cat([2 * alpha * a[:N_W], torch.zeros(N_HEAD)])
    expected = -(jacrev(per_example)(wu) @ inv(hessian(G)(wu), rhs))
    assert float((ours - expected).norm() / expected.norm()) < 1e-6


def test_evaluation_is_in_eval_mode_and_training_leaves_the_mode_as_it_found_it():
    (x, y) = data(0, 64, 0)
    net = TwoStageNet(embedding(), nn.Linear(DE, K))
    net.train()  # as a user's network may arrive
    first, second = evaluate(net, (x, y), 16), evaluate(net, (x, y), 16)
    assert first == second, "dropout must be off and batch statistics unused when evaluating"
    assert net.training, "evaluate puts the network back in the mode it found it in"
    net.eval()
    with torch.no_grad():
        manual = (net(x).argmax(1) == y).double().mean().item()
    assert first["accuracy"] == pytest.approx(manual)
    recipe = OmegaConf.create({"optimizer": "sgd", "lr": 0.1, "weight_decay": 0.0, "batch_size": 16, "steps": 5})
    before = net.embedding[1].running_mean.clone()
    fit(net, list(net.parameters()), x, y, recipe, 0, "", show_progress=False)
    assert not net.training, "fit trains in train mode and restores eval mode"
    assert not torch.equal(before, net.embedding[1].running_mean), "training updates the running statistics"


def test_the_shipped_resnet_is_built_in_eval_mode_with_batchnorm():
    model = OmegaConf.create(
        {
            "name": "resnet8",
            "embedding": {"_target_": "msif.models.ResNetEmbedding", "widths": [4, 8, 8], "blocks": [1, 1, 1]},
            "head": {"_target_": "msif.models.MLPHead", "hidden": []},
        }
    )
    net = build_pretrain_net(model, (3, 16, 16), 2, seed=0)
    assert not net.training
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert net(torch.zeros(2, 3, 16, 16, dtype=torch.float32)).shape == (2, 2)


def test_a_batchnorm_network_runs_through_the_command_and_says_it_scores_eval_mode(env):
    from tests.helpers.cli import msif, ok

    layers = "[{conv:8,kernel:3,batchnorm:true},{pool:2},{dropout:0.2}]"
    args = ["dataset=digits", f"model.embedding.layers={layers}", "train.pretrain.steps=40", "train.finetune.steps=40"]
    out = ok(msif(["influence", *args]))
    assert "BatchNorm2d, Dropout" in out.stdout and "eval mode" in out.stdout
