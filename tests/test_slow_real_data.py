"""Slow tests (`make test-slow`): the Table A networks on the real MNIST and CIFAR-10 copies beside the checkout."""

from __future__ import annotations

import copy
import tarfile

import pytest
import torch
import torch.nn.functional as F

from msif.influence import MultiStageInfluence, default_solver
from msif.lifecycle import Context
from msif.stages.finetune import finetuned
from tests.helpers.cli import msif
from tests.helpers.configs import SHARED_DATA, compose_cfg

pytestmark = pytest.mark.slow

SHORT = [
    "train.pretrain.steps=40",
    "train.finetune.steps=40",
    "dataset.finetune.n_train=500",
    "dataset.finetune.n_test=200",
]


@pytest.fixture(scope="session")
def shared_copy(tmp_path_factory):
    """The shared MNIST and CIFAR-10 copies in one temporary data root (and one decode cache) for the session."""
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip("no shared data beside the checkout")
    base = tmp_path_factory.mktemp("real")
    root = base / "data"
    root.mkdir()
    (root / "MNIST").symlink_to(SHARED_DATA / "MNIST")
    with tarfile.open(SHARED_DATA / "cifar10-jpeg.tar.gz") as tar:
        tar.extractall(root, filter="data")
    return root, base / "cache"


@pytest.fixture
def real_data(shared_copy, monkeypatch, env):
    root, cache = shared_copy
    monkeypatch.setenv("MSIF_DATA", str(root))
    monkeypatch.setenv("MSIF_CACHE", str(cache))
    return root


@pytest.mark.parametrize("dataset", ["mnist", "cifar"])
@pytest.mark.parametrize("case", ["fixed", "updated"])
def test_influence_on_the_paper_networks_matches_a_per_example_gradient_loop(dataset, case, real_data):
    cfg = compose_cfg("influence", [f"dataset={dataset}", f"case={case}", *SHORT])
    env = Context(cfg)
    pre, fin = finetuned(cfg, env)
    pre_set, test = env.tasks(cfg).pretrain.train, env.tasks(cfg).finetune.test
    msi = MultiStageInfluence(
        pre.net,
        fin.net,
        pre_set,
        env.tasks(cfg).finetune.train,
        case=case,
        alpha=0.01,
        solver=default_solver("cg_normal", 1e-2, 1e-4, iterations=10, max_residual=10.0),
        hessian_sample=100,
        finetune_hessian_sample=200,
        batch_size=50,
    )
    S = msi.target_vectors(test.x, test.y)
    rows = torch.arange(0, len(pre_set), len(pre_set) // 40)[:40]
    ours = msi.score(S, rows)[:, 0]
    net = copy.deepcopy(msi.pretrain_net)  # msif's own copy holds its parameters without gradients
    params = [p.requires_grad_(True) for p in net.parameters()]
    parts = list(msi.pre_space.unflatten(S[0]).values())
    naive = torch.stack(
        [
            -sum(
                (g * s).sum()
                for g, s in zip(
                    torch.autograd.grad(F.cross_entropy(net(pre_set.x[i : i + 1]), pre_set.y[i : i + 1]), params),
                    parts,
                    strict=True,
                )
            )
            for i in rows
        ]
    )
    assert torch.isfinite(ours).all() and ours.abs().max() > 0
    assert (ours - naive).abs().max() <= 1e-4 * naive.abs().max()


def test_the_cli_runs_influence_on_mnist_from_the_shared_copy(real_data, env, tmp_path):
    proc = msif(
        [
            "influence",
            "dataset=mnist",
            *SHORT,
            "hessian.pretrain_sample=100",
            "profile.budget.cg_iterations=5",
            "solver.pretrain.max_residual=10",
            "solver.finetune.max_residual=10",
        ]
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "m=24,754 pretraining examples" in proc.stdout
    assert list((tmp_path / "outputs").rglob("influence_grid.png"))
