"""Hessian-vector products of a small network, both ways msif forms them, against the explicit Hessian."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import hessian

from msif.influence.hessian import Hessian
from msif.influence.params import ParamSpace, summed_loss


@pytest.fixture()
def problem():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 3)).double()
    params = {n: p.detach() for n, p in net.named_parameters()}
    space = ParamSpace(params)
    point = space.flatten(params)
    x = torch.randn(50, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (50,))
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 50, 16)]  # the last batch is smaller
    loss = summed_loss(net, space)
    explicit = hessian(lambda q: loss(q, (x, y)))(point) / 50
    return loss, point, batches, explicit


@pytest.mark.parametrize("budget", [2**30, 0])
def test_hvps_equal_the_explicit_hessian_with_and_without_kept_graphs(problem, budget):
    loss, point, batches, explicit = problem
    H = Hessian(loss, point, batches, shift=torch.full_like(point, 0.3))
    H.graph_budget = budget
    V = torch.randn(5, point.numel(), dtype=torch.float64)
    for _ in range(2):  # the second product reuses the kept graphs
        got = H.matvec(V)
        assert torch.allclose(got, V @ explicit + 0.3 * V, atol=1e-10, rtol=1e-9)
        assert torch.allclose(H.matvec(V[:1]), got[:1], atol=1e-12)  # one direction: the unbatched path
    kept = H._graphs is not None
    assert kept == (budget > 0)
    assert (H.graph_bytes is not None) == (budget > 0)
    H.release()
    assert H._graphs is None
    assert H.calls == 12


def test_graphs_over_the_budget_are_not_kept(problem):
    loss, point, batches, explicit = problem
    H = Hessian(loss, point, batches)
    H.graph_budget = 1024  # far less than one batch's graph
    v = torch.randn(1, point.numel(), dtype=torch.float64)
    assert torch.allclose(H.matvec(v), v @ explicit, atol=1e-10)
    assert H._graphs is None and H.graph_bytes > 1024
    assert torch.allclose(H.matvec(v), v @ explicit, atol=1e-10)  # and not retried: forward-over-reverse again


def test_graphs_are_dropped_when_the_process_outgrows_the_budget(problem, monkeypatch):
    """The saved-tensor estimate can miss memory autograd holds: resident growth past the budget drops the graphs."""
    from msif.influence import hessian as module

    loss, point, batches, explicit = problem
    monkeypatch.setattr(module, "_saved_bytes", lambda build: (1, build()))  # an estimate far too small
    resident = iter(range(0, 10**9, 600))  # 600 bytes more at every reading
    monkeypatch.setattr(module, "_resident_bytes", lambda: next(resident))
    H = Hessian(loss, point, batches, graph_budget=1000)
    v = torch.randn(2, point.numel(), dtype=torch.float64)
    assert torch.allclose(H.matvec(v), v @ explicit, atol=1e-10)  # forward-over-reverse after the drop
    assert H._graphs is None and H.graph_bytes > 1000
    assert torch.allclose(H.matvec(v), v @ explicit, atol=1e-10)  # and not retried
    assert H._graphs is None


def test_resident_bytes_reads_this_process():
    from msif.influence.hessian import _resident_bytes

    before = _resident_bytes()
    if before is None:
        pytest.skip("no /proc here")
    # 64 MiB of fresh pages, mapped and touched directly: a tensor could be served from memory the allocator kept
    # resident (msif.allocator, which any in-process `msif` command of this test session switches on)
    import mmap

    block = mmap.mmap(-1, 64 * 2**20)
    for offset in range(0, len(block), mmap.PAGESIZE):
        block[offset] = 1
    assert _resident_bytes() - before > 32 * 2**20
    block.close()


def test_a_product_applied_once_builds_no_graphs_but_uses_kept_ones(problem):
    loss, point, batches, explicit = problem
    H = Hessian(loss, point, batches)
    v = torch.randn(2, point.numel(), dtype=torch.float64)
    assert torch.allclose(H.matvec(v, once=True), v @ explicit, atol=1e-10)
    assert H._graphs is None and H.graph_bytes is None  # forward-over-reverse, nothing built or measured
    H.matvec(v)  # a solve's products keep them
    kept = H._graphs
    assert torch.allclose(H.matvec(v, once=True), v @ explicit, atol=1e-10)
    assert H._graphs is kept
