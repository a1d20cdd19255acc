"""The numerical library (msif.influence) on its own: no Hydra, rich or CLI; typed, validated solver settings;
plain errors and warnings; progress and messages only through msif.progress and logging."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from msif.errors import SolverError, UnconvergedSolveWarning
from msif.influence import LanczosSettings, MultiStageInfluence, default_solver, solver_settings
from msif.influence.hessian import Hessian
from msif.influence.solvers import solve
from msif.progress import set_progress_factory


def test_the_numerical_library_imports_and_computes_without_hydra_rich_or_the_cli():
    """A fresh interpreter imports msif.influence and runs a whole multi-stage computation; afterwards none of the
    command line's modules has been imported."""
    script = textwrap.dedent(
        """
        import json, sys
        import torch
        from torch import nn
        from msif.influence import MultiStageInfluence

        class Net(nn.Module):
            def __init__(self, embedding, head):
                super().__init__()
                self.embedding, self.head = embedding, head
            def forward(self, x):
                return self.head(self.embedding(x).flatten(1))

        torch.manual_seed(0)
        emb = nn.Sequential(nn.Linear(4, 3), nn.Tanh())
        pre, fin = Net(emb, nn.Linear(3, 2)), Net(emb, nn.Linear(3, 3))
        x, y = torch.randn(40, 4), torch.randint(0, 2, (40,))
        xf, yf = torch.randn(30, 4), torch.randint(0, 3, (30,))
        scores = MultiStageInfluence(pre, fin, (x, y), (xf, yf), hessian_sample=None).influence(xf[:5], yf[:5])
        assert scores.shape == (40,) and torch.isfinite(scores).all()
        cli = {"hydra", "rich", "omegaconf"}
        ours = {"msif.cli", "msif.console", "msif.config", "msif.lifecycle", "msif.stages"}
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in cli or m in ours)))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def quadratic(p: int = 12, n: int = 40, seed: int = 0):
    """H = XᵀX / n, the Hessian of the mean of ½ (xᵀq)² over the rows x of X: an explicit SPD matrix."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g, dtype=torch.float64)

    def loss(q, batch):
        return 0.5 * ((batch[0] @ q) ** 2).sum()

    y = torch.zeros(n)  # unused by the loss; H divides by the number of examples
    H = Hessian(loss, torch.zeros(p, dtype=torch.float64), [(X[:20], y[:20]), (X[20:], y[20:])])
    return H, (X.T @ X / n).numpy()


def test_lanczos_and_cg_solve_the_explicit_system():
    H, dense = quadratic()
    b = torch.randn(2, dense.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lam = 1e-2
    for settings, A, rhs in [
        (LanczosSettings(damping=lam, tol=1e-12), dense @ dense + lam * np.eye(len(dense)), b.numpy() @ dense),
        ({"method": "cg", "damping": lam, "tol": 1e-12}, dense + lam * np.eye(len(dense)), b.numpy()),
    ]:
        X, report = solve(H, b, settings, "pretrain")
        expected = np.linalg.solve(A, rhs.T).T
        assert np.allclose(X.numpy(), expected, rtol=1e-7, atol=1e-9), report
        assert report.residual < 1e-8


@pytest.mark.parametrize(
    "spec, key",
    [
        ({"method": "lanczos", "damping": -1.0}, "damping"),
        ({"method": "lanczos", "iters": 3}, "iters"),
        ({"method": "lanczos", "iterations": 0}, "iterations"),
        ({"method": "lowrank", "rank": 2.5}, "rank"),
        ({"method": "newton"}, "newton"),
        ({"method": "cg", "tol": -1e-6}, "tol"),
    ],
)
def test_bad_solver_settings_are_refused_naming_the_setting(spec, key):
    with pytest.raises(SolverError) as err:
        solver_settings(spec, "pretrain")
    assert isinstance(err.value, ValueError)
    assert key in err.value.message and err.value.hessian == "pretrain"
    assert err.value.keys == (("method",) if key == "newton" else (key,))
    assert "solver." not in err.value.message  # command-line syntax is the CLI's business


def test_settings_are_the_shipped_defaults_and_refuse_a_malformed_solver_pair():
    s = solver_settings({"method": "lanczos", "damping": 0})
    assert isinstance(s, LanczosSettings) and s.damping == 0.0 and s.iterations == 100 and s.normal is True
    with pytest.raises(ValueError, match="pretrain"):
        MultiStageInfluence(
            torch.nn.Module(), torch.nn.Module(), (torch.zeros(1), torch.zeros(1)), (), solver={"finetune": {}}
        )
    assert set(default_solver()) == {"pretrain", "finetune"}


def test_an_unconverged_solve_warns_and_one_above_max_residual_is_an_error():
    H, _ = quadratic()
    b = torch.ones(1, H.size, dtype=torch.float64)
    with pytest.warns(UnconvergedSolveWarning, match="stopped at relative residual"):
        solve(H, b, {"method": "cg", "iterations": 1, "tol": 1e-12}, "pretrain")
    with pytest.raises(SolverError, match="did not converge") as err:
        solve(H, b, {"method": "cg", "iterations": 1, "tol": 1e-12, "max_residual": 1e-6}, "finetune")
    assert err.value.hessian == "finetune" and "damping" in err.value.keys


def test_progress_and_messages_reach_whatever_the_caller_installed(caplog, tmp_path):
    events = []

    class Recorder:
        def __init__(self, transient):
            events.append(("bar", transient))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def add_task(self, description, total=None, **fields):
            events.append(("task", description))
            return 0

        def update(self, task, **kw):
            events.append(("update", kw.get("completed")))

        def advance(self, task, advance=1):
            events.append(("advance", advance))

    H, _ = quadratic()
    H.cache_dir = tmp_path
    set_progress_factory(Recorder)
    try:
        with caplog.at_level(logging.INFO, logger="msif"):
            solve(H, torch.ones(1, H.size, dtype=torch.float64), {"method": "lowrank", "rank": 12}, "pretrain")
    finally:
        set_progress_factory(None)
    assert ("task", "fitting the Hessian's Ritz pairs (lanczos)") in events
    assert any(kind == "update" for kind, _ in events)
    assert any("curvature: fitted 12 Ritz pairs" in r.getMessage() for r in caplog.records)
    assert list(tmp_path.glob("ritz-*-r12-s0.pt"))


def test_a_network_or_labels_outside_the_contract_get_one_paragraph_before_any_work():
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    x, y = torch.randn(20, 4), torch.randint(0, 2, (20,))
    with pytest.raises(ValueError, match=r"matches the embedding globs \['embedding\.\*'\].*embedding='features\.\*'"):
        MultiStageInfluence(plain, plain, (x, y), (x, y))

    class Net(torch.nn.Module):
        def __init__(self, k):
            super().__init__()
            self.embedding, self.head = (
                torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh()),
                torch.nn.Linear(3, k),
            )

        def forward(self, x):
            return self.head(self.embedding(x).flatten(1))

    with pytest.raises(ValueError, match=r"labels run from 0 to 7, but the network has 2 outputs.*0\.\.1"):
        MultiStageInfluence(Net(2), Net(2), (x, y), (x, y * 7))
    with pytest.raises(ValueError, match="not class indices"):
        MultiStageInfluence(Net(2), Net(2), (x, y.float()), (x, y))
    from msif.influence import SingleStageInfluence

    with pytest.raises(ValueError, match="labels run from -1 to 1"):
        SingleStageInfluence(plain, (x, y - 1 + (y > 0).long()))
