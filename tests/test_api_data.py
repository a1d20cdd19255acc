"""The Python API on a user's own objects: a loss of their own on dict batches, networks that name W their way,
part of W tracked, and data streamed from Datasets, DataLoaders and iterables — checked against explicit Hessians of
hand-written losses (float64) and against the (x, y) tensor path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev
from torch.utils.data import DataLoader, Dataset, IterableDataset

from msif.influence import MultiStageInfluence, SingleStageInfluence, default_solver
from msif.influence.batches import Examples

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.usefixtures("float64")]

DX, D1, D2, R, K = 4, 5, 3, 2, 3  # inputs, two embedding widths, regression outputs (pretraining), classes


class Model(nn.Module):
    """A torchvision-style network: `features` then `classifier` (no `.embedding` / `.head`)."""

    def __init__(self, outputs: int):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(DX, D1), nn.Tanh(), nn.Linear(D1, D2), nn.Tanh())
        self.classifier = nn.Linear(D2, outputs)

    def forward(self, x):
        return self.classifier(self.features(x))


def regression_loss(net, params, batch):
    """Per-example ½‖f(x) − t‖² over dict batches {"inputs", "targets"}: a loss msif does not know."""
    out = functional_call(net, params, (batch["inputs"],))
    return 0.5 * (out - batch["targets"]).pow(2).sum(1)


def data(seed=0, m=30, n=24, t=6):
    g = torch.Generator().manual_seed(seed)
    xp, tp = torch.randn(m, DX, generator=g), torch.randn(m, R, generator=g)
    xf, yf = torch.randn(n, DX, generator=g), torch.randint(0, K, (n,), generator=g)
    xt, yt = torch.randn(t, DX, generator=g), torch.randint(0, K, (t,), generator=g)
    return (xp, tp), (xf, yf), (xt, yt)


def nets(seed=0, updated=False):
    torch.manual_seed(seed)
    pre, fin = Model(R), Model(K)
    fin.features.load_state_dict(pre.features.state_dict())
    if updated:  # a finetuned embedding that moved away from the pretrained one
        with torch.no_grad():
            for p in fin.features.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return pre, fin


class Dicts(Dataset):
    """A map-style data set of dict examples that counts its reads."""

    def __init__(self, x, t):
        self.x, self.t, self.reads = x, t, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads += 1
        return {"inputs": self.x[i], "targets": self.t[i]}


# ---------------------------------------------------------------------------------------------------------------
# The independent computation: the networks written out by hand, explicit Hessians, dense solves.


def flat(net: Model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def forward(vec: torch.Tensor, x: torch.Tensor, outputs: int) -> torch.Tensor:
    sizes = [D1 * DX, D1, D2 * D1, D2, outputs * D2, outputs]
    A, a, B, b, C, c = torch.split(vec, sizes)
    h = torch.tanh(torch.tanh(x @ A.view(D1, DX).T + a) @ B.view(D2, D1).T + b)
    return h @ C.view(outputs, D2).T + c


def explicit(pre, fin, pre_data, fin_data, test, case, alpha, lam, tracked: slice) -> torch.Tensor:
    """Multi-stage scores with only the entries `tracked` of W varying (the rest constant), by dense algebra:
    (H + λI)⁻¹ for each inverse, MATH.md's steps with explicit Hessians."""
    (xp, tp), (xf, yf), (xt, yt) = pre_data, fin_data, test
    n_emb = D1 * DX + D1 + D2 * D1 + D2
    wu0, wt0 = flat(pre), flat(fin)
    idx = torch.arange(n_emb)[tracked]
    nw = len(idx)

    def place(base, w, head):
        out = base.clone()
        out[idx] = w
        return torch.cat([out[:n_emb], head])

    def per_pre(v):  # v = [w_tracked ; u]
        out = forward(place(wu0, v[:nw], v[nw:]), xp, R)
        return 0.5 * (out - tp).pow(2).sum(1)

    def G(v):
        return per_pre(v).mean()

    def Fn(v):
        return F.cross_entropy(forward(place(wt0, v[:nw], v[nw:]), xf, K), yf)

    def LT(v):
        return F.cross_entropy(forward(place(wt0, v[:nw], v[nw:]), xt, K), yt, reduction="sum")

    def inv(H, b):
        return torch.linalg.solve(H + lam * torch.eye(len(H)), b)

    vu = torch.cat([wu0[idx], wu0[n_emb:]])
    vt = torch.cat([wt0[idx], wt0[n_emb:]])
    v = jacrev(LT)(vt)
    HF = hessian(Fn)(vt)
    n_u = len(wu0) - n_emb
    if case == "fixed":
        a = inv(HF[nw:, nw:], v[nw:])
        rhs = torch.cat([v[:nw] - HF[nw:, :nw].T @ a, torch.zeros(n_u)])
    else:
        P = torch.diag(torch.cat([torch.ones(nw), torch.zeros(len(vt) - nw)]))
        a = inv(HF + 2 * alpha * P, v)
        rhs = torch.cat([2 * alpha * a[:nw], torch.zeros(n_u)])
    s = inv(hessian(G)(vu), rhs)
    return -(jacrev(per_pre)(vu) @ s)


def rel(a, b):
    return float((a - b).norm() / b.norm())


LAM = 0.05


def solver():
    return default_solver("exact", pretrain_damping=LAM, finetune_damping=LAM, normal=False)


@pytest.mark.parametrize("case", ["fixed", "updated"])
@pytest.mark.parametrize("track", [None, ["features.2.*"]])
def test_a_loss_of_your_own_on_dict_batches_and_part_of_W_equal_explicit_hessians(case, track):
    """A regression loss over a map-style Dataset of dicts, W named `features.*` (and, tracked, only its second
    layer) equals the dense computation with explicit Hessians of the hand-written network."""
    pre_data, fin_data, test = data()
    pre, fin = nets(updated=case == "updated")
    dataset = Dicts(*pre_data)
    msi = MultiStageInfluence(
        pre,
        fin,
        dataset,
        DataLoader(torch.utils.data.TensorDataset(*fin_data), batch_size=5),
        case=case,
        alpha=0.1,
        solver=solver(),
        hessian_sample=None,
        batch_size=7,
        embedding="features.*",
        embedding_params=track,
        pretrain_loss=regression_loss,
    )
    got = msi.influence(*test)
    tracked = slice(None) if track is None else slice(D1 * DX + D1, None)
    want = explicit(pre, fin, pre_data, fin_data, test, case, 0.1, LAM, tracked)
    assert rel(got, want) < 1e-8
    counts = msi.parameter_counts()
    assert counts["W"] == (D1 * DX + D1 + D2 * D1 + D2 if track is None else D2 * D1 + D2)
    assert len(msi.held_fixed) == (0 if track is None else 2)
    # streamed: the Hessian sample (all 30), the checks' first batch (2) and one scoring pass (30), nothing more
    assert dataset.reads == 30 + 2 + 30


class Batches(IterableDataset):
    """An iterable data set yielding ready batches of 7 (no random access, no len)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        for i in range(0, len(self.x), 7):
            yield self.x[i : i + 7], self.y[i : i + 7]


def test_datasets_loaders_and_iterables_give_the_scores_of_tensors():
    """The default cross-entropy on (x, y) data given four ways: the same scores, also for a subset of rows and per
    test point; a Hessian sample of rows drawn from an iterable keeps only those rows."""
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(33, DX, generator=g), torch.randint(0, K, (33,), generator=g)
    xf, yf = torch.randn(20, DX, generator=g), torch.randint(0, K, (20,), generator=g)
    pre, fin = Model(K), Model(K)
    fin.features.load_state_dict(pre.features.state_dict())
    common = {"solver": solver(), "hessian_sample": 12, "batch_size": 8, "embedding": "features.*"}
    ref = MultiStageInfluence(pre, fin, (x, y), (xf, yf), **common)
    want = ref.influence(xf[:5], yf[:5])
    want_per = ref.influence(xf[:5], yf[:5], per_test=True)
    tensors = torch.utils.data.TensorDataset(x, y)
    for given in (tensors, DataLoader(tensors, batch_size=4), DataLoader(Batches(x, y), batch_size=None)):
        msi = MultiStageInfluence(pre, fin, given, (xf, yf), **common)
        assert torch.equal(msi.hessian_index, ref.hessian_index)
        assert torch.allclose(msi.influence(xf[:5], yf[:5]), want, rtol=1e-10, atol=1e-12)
        rows = torch.tensor([1, 4, 30])
        assert torch.allclose(msi.influence(xf[:5], yf[:5], indices=rows), want[rows], rtol=1e-10, atol=1e-12)
        test_loader = DataLoader(torch.utils.data.TensorDataset(xf[:5], yf[:5]), batch_size=2)
        assert torch.allclose(msi.influence(test_loader, per_test=True), want_per, rtol=1e-10, atol=1e-12)
    single = SingleStageInfluence(pre, DataLoader(Batches(x, y), batch_size=None), solver=solver()["pretrain"])
    assert torch.allclose(
        single.influence(x[:3], y[:3]),
        SingleStageInfluence(pre, (x, y), solver=solver()["pretrain"]).influence(x[:3], y[:3]),
        rtol=1e-10,
        atol=1e-12,
    )
    stream = Examples(DataLoader(Batches(x, y), batch_size=None))
    got = list(stream.batches(5, torch.tensor([0, 6, 7, 8, 20, 32])))
    assert [len(b[1]) for b in got] == [5, 1]
    assert torch.equal(torch.cat([b[0] for b in got]), x[[0, 6, 7, 8, 20, 32]])
    with pytest.raises(ValueError, match="increasing order"):
        list(stream.batches(5, torch.tensor([6, 0])))


def test_a_loss_or_data_outside_the_protocol_get_one_paragraph_before_any_work():
    pre_data, fin_data, test = data()
    pre, fin = nets()
    common = {"embedding": "features.*", "solver": solver(), "hessian_sample": None}
    dicts = Dicts(*pre_data)
    with pytest.raises(ValueError, match=r"returned \(\) for a batch of 2 examples, not one loss per example"):
        MultiStageInfluence(
            pre, fin, dicts, fin_data, pretrain_loss=lambda n, p, b: regression_loss(n, p, b).sum(), **common
        )
    with pytest.raises(ValueError, match=r"pretraining loss failed on the first batch of the data: KeyError"):
        MultiStageInfluence(pre, fin, dicts, fin_data, pretrain_loss=lambda n, p, b: b["missing"], **common)
    other = Model(K)
    other.features = nn.Sequential(nn.Linear(DX, D1), nn.Tanh(), nn.Linear(D1, D2 + 1), nn.Tanh())
    other.classifier = nn.Linear(D2 + 1, K)
    with pytest.raises(ValueError, match="The two networks' embeddings differ"):
        MultiStageInfluence(pre, other, dicts, fin_data, pretrain_loss=regression_loss, **common)
    with pytest.raises(ValueError, match="tracked globs"):
        MultiStageInfluence(
            pre,
            fin,
            dicts,
            fin_data,
            pretrain_loss=regression_loss,
            embedding_params="nope.*",
            **{k: v for k, v in common.items()},
        )
    bad = torch.utils.data.TensorDataset(fin_data[0], torch.where(torch.arange(24) > 20, 9, fin_data[1]))
    fin_pre = Model(K)
    fin_pre.features.load_state_dict(fin.features.state_dict())
    with pytest.raises(ValueError, match=r"A batch of the pretraining data has labels from 0 to 9.*3 outputs"):
        MultiStageInfluence(fin_pre, fin, bad, fin_data, **common)
    with pytest.raises(ValueError, match="have 30 inputs but 29 labels"):
        MultiStageInfluence(pre, fin, (pre_data[0], pre_data[1][:29]), fin_data, **common)
