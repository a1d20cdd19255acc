"""`msif cleanse`: which examples are removed, that the retrains never see them, seeding, resuming, bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from msif.cleanse import compare_conditions, harmful_rows, kept_rows, random_rows, retrain_without
from msif.errors import MsifError
from msif.lifecycle import Context
from msif.stages import cleanse
from msif.stages.finetune import finetuned
from tests.helpers.cli import msif, ok, refused
from tests.helpers.configs import compose_cfg

# one torch thread per retrain (not all cores): the retrains are small, and a second thread only adds OpenMP barriers
FAST = [
    "dataset=tiny",
    "cleanse.seeds=[0,1]",
    "train.pretrain.steps=40",
    "train.finetune.steps=40",
    "cleanse.threads=1",
]


def test_harmful_rows_are_the_largest_positive_scores_and_no_others():
    scores = pd.DataFrame({"index": np.arange(10), "score": [0.5, -2.0, 3.0, 0.0, 1.5, -0.1, 2.0, 0.2, -5.0, 0.9]})
    r = harmful_rows(scores, 0.3, 10)
    assert r.asked == 3 and r.positive == 6
    assert r.rows.tolist() == [2, 6, 4]
    few = harmful_rows(scores, 0.8, 10)  # 8 asked, only 6 positive: zero and negative scores are never removed
    assert few.rows.tolist() == [2, 6, 4, 9, 0, 7]


def test_random_removal_is_seeded_reproducible_and_differs_between_seeds():
    a, b = random_rows(1000, 100, 0, 1), random_rows(1000, 100, 0, 1)
    assert np.array_equal(a, b) and len(set(a.tolist())) == 100 and a.min() >= 0 and a.max() < 1000
    assert not np.array_equal(a, random_rows(1000, 100, 0, 2))
    assert not np.array_equal(a, random_rows(1000, 100, 1, 1))
    assert kept_rows(10, np.array([3, 7])).tolist() == [0, 1, 2, 4, 5, 6, 8, 9]


@pytest.mark.parametrize("start", ["scratch", "warm"])
def test_the_retrain_sees_every_kept_example_and_never_a_removed_one(env, prebuilt, start):
    prebuilt("influence", FAST, upto="finetune", config="cleanse")
    cfg = compose_cfg("cleanse", FAST)
    s = Context(cfg)
    pre, _ = finetuned(cfg, s)
    m = len(s.tasks(cfg).pretrain.train)
    removed = np.array([0, 5, 17, m - 1])
    seen: list = []
    retrain_without(
        cfg, s.tasks(cfg), removed, 0, s.device, s.dtype, start=start, pretrained=pre.net, warm_steps=40, record=seen
    )
    rows = set(torch.cat(seen).tolist())
    assert rows == set(range(m)) - set(removed.tolist())


def test_no_removal_from_scratch_reproduces_the_pretrain_and_finetune_stages(env):
    cfg = compose_cfg("cleanse", FAST + ["seed=1"])
    s = Context(cfg)
    _, fin = finetuned(cfg, s)
    again = retrain_without(cfg, s.tasks(cfg), np.zeros(0, dtype=np.int64), 1, s.device, s.dtype)
    assert again["test_accuracy"] == fin.metrics["test"]["accuracy"]
    assert again["test_loss"] == pytest.approx(fin.metrics["test"]["loss"], rel=1e-6)


def test_compare_conditions_pairs_by_seed():
    frame = pd.DataFrame(
        {
            "seed": [0, 0, 0, 1, 1, 1],
            "condition": ["none", "harmful", "random"] * 2,
            "test_accuracy": [0.50, 0.52, 0.49, 0.60, 0.61, 0.58],
            "test_loss": [1.0, 0.9, 1.1, 0.8, 0.7, 0.85],
        }
    )
    out = compare_conditions(frame)
    assert out["conditions"]["none"]["test_accuracy_mean"] == pytest.approx(0.55)
    assert out["conditions"]["none"]["test_accuracy_std"] == pytest.approx(np.std([0.5, 0.6], ddof=1))
    d = out["paired"]["harmful - none"]["test_accuracy"]
    assert d["mean"] == pytest.approx(0.015) and d["per_seed"] == {0: pytest.approx(0.02), 1: pytest.approx(0.01)}
    assert out["paired"]["harmful - random"]["test_loss"]["mean"] == pytest.approx(-0.175)
    # the paired t-test by hand: t = mean / (sd / √n) on n − 1 = 1 degree of freedom, p = 2 (1 − F_t(|t|))
    diffs = np.array([0.02, 0.01])
    t = diffs.mean() / (diffs.std(ddof=1) / np.sqrt(2))
    assert d["t"] == pytest.approx(t) and d["n"] == 2
    assert d["p_value"] == pytest.approx(1 - 2 * np.arctan(abs(t)) / np.pi)  # Student t with 1 dof is Cauchy
    half = 12.706204736 * diffs.std(ddof=1) / np.sqrt(2)  # t_{0.975, 1}
    assert d["ci95"] == pytest.approx([diffs.mean() - half, diffs.mean() + half], rel=1e-6)


def test_cleanse_end_to_end_writes_its_tables_and_resumes(env, prebuilt):
    prebuilt("influence", FAST, config="cleanse")
    cfg = compose_cfg("cleanse", FAST)
    result = cleanse(cfg)
    frame = result.table
    assert list(zip(frame["seed"], frame["condition"], strict=True)) == [
        (s, c) for s in (0, 1) for c in ("none", "harmful", "random")
    ]
    removed = pd.read_csv(result.path / "removed.csv")
    scores = pd.read_parquet(result.path.parent / "scores.parquet")
    # the expected removal straight from the table: positive scores, largest first (ties by index), 10% of m
    index, score = scores["index"].to_numpy(), scores["score"].to_numpy()
    order = np.lexsort((index, -score))
    expected = index[order][score[order] > 0][: round(0.1 * len(scores))]
    harmful = removed[removed["condition"] == "harmful"]
    assert harmful["index"].tolist() == expected.tolist()
    assert len(expected) == round(0.1 * len(scores))
    by_index = scores.set_index("index")["score"]
    assert by_index[expected].min() > 0 and by_index[expected].min() >= by_index.drop(expected).max()
    for seed in (0, 1):
        drawn = removed[(removed["condition"] == "random") & (removed["seed"] == seed)]["index"].to_numpy()
        assert np.array_equal(drawn, random_rows(len(scores), len(expected), 0, seed))
    assert (frame.loc[frame["condition"] != "none", "removed"] == len(expected)).all()
    assert (result.path / "cleanse.png").stat().st_size > 0
    assert set(result.summary["paired"]) == {"harmful - none", "random - none", "harmful - random"}

    # a rerun retrains nothing and gives the same table; more seeds only add their rows
    again = cleanse(cfg)
    pd.testing.assert_frame_equal(again.table, frame)
    more = cleanse(compose_cfg("cleanse", FAST[:1] + ["cleanse.seeds=[0,1,2]"] + FAST[2:]))
    assert len(more.table) == 9
    pd.testing.assert_frame_equal(more.table.iloc[:6], frame)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("cleanse.fraction=1.5", "cleanse.fraction"),
        ("cleanse.seeds=[]", "cleanse.seeds"),
        ("cleanse.start=hot", "cleanse.start"),
        ("target.per_test=true", "per_test"),
    ],
)
def test_bad_cleanse_settings_are_refused_before_any_work(env, override, needle):
    with pytest.raises(MsifError, match=needle):
        cleanse(compose_cfg("cleanse", FAST + [override]))


def test_a_cleanse_row_cut_off_is_retrained_and_a_repeated_row_is_refused(env, prebuilt):
    prebuilt("influence", FAST, config="cleanse")
    cfg = compose_cfg("cleanse", FAST[:1] + ["cleanse.seeds=[0]"] + FAST[2:])
    result = cleanse(cfg)
    csv = result.path / "cleanse.csv"
    whole = csv.read_text()
    csv.write_text(whole[:-5])  # the last append cut off
    again = cleanse(cfg)
    cols = ["seed", "condition", "removed", "test_accuracy", "test_loss", "pretrain_test_accuracy"]
    pd.testing.assert_frame_equal(again.table[cols], result.table[cols])
    lines = csv.read_text().splitlines(keepends=True)
    csv.write_text("".join(lines + lines[1:2]))  # a row twice
    before = csv.read_text()
    with pytest.raises(MsifError, match="repeats a row"):
        cleanse(cfg)
    assert csv.read_text() == before


def test_msif_cleanse_command(env, prebuilt):
    prebuilt("influence", FAST, config="cleanse")
    res = msif(["cleanse", *FAST])
    ok(res)
    assert "paired differences" in res.stdout
    refused(msif(["cleanse", "dataset=tiny", "cleanse.fraction=0"]), "cleanse.fraction")


@pytest.mark.slow
def test_retrains_spread_over_worker_processes_give_the_same_table(env, prebuilt):
    """cleanse.workers=2 runs the retrains in two spawned processes; with the same threads per retrain the table is
    the one a single process makes (only the seconds differ)."""
    import shutil

    prebuilt("influence", FAST, config="cleanse")
    one = cleanse(compose_cfg("cleanse", FAST))  # FAST: cleanse.threads=1, in both runs
    shutil.rmtree(one.path)  # the worker count is not part of the run's signature: the same folder is remade
    two = cleanse(compose_cfg("cleanse", FAST + ["cleanse.workers=2"]))
    assert two.path == one.path
    pd.testing.assert_frame_equal(two.table.drop(columns="seconds"), one.table.drop(columns="seconds"))
