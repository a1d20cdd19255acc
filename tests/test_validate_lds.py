"""`msif validate-lds`: the linear datamodeling score over random-subset retrains."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from msif.lds import group_effect, per_test_lds, removed_rows
from msif.stages import validate_lds
from tests.helpers.cli import msif, ok, refused
from tests.helpers.configs import compose_cfg
from tests.test_validate_loo import CONVEX

FAST = ["dataset=tiny", "lds.subsets=6", "loo.pretrain_steps=5", "loo.finetune_steps=5", "lds.bootstrap=50"]


def test_subsets_are_seeded_and_group_effects_add_the_left_out_scores():
    a, b = removed_rows(100, 0.7, 0, 3), removed_rows(100, 0.7, 0, 3)
    assert np.array_equal(a, b) and len(a) == 30 and len(set(a)) == 30
    assert not np.array_equal(a, removed_rows(100, 0.7, 0, 4)) and not np.array_equal(a, removed_rows(100, 0.7, 1, 3))
    scores = np.arange(100, dtype=float)
    assert group_effect(scores, a, 100) == pytest.approx(-scores[a].sum() / 100)
    per = np.stack([scores, -scores], 1)
    assert np.allclose(group_effect(per, a, 100), [-scores[a].sum() / 100, scores[a].sum() / 100])


def test_per_test_lds_is_the_spearman_correlation_of_each_column():
    g = np.random.default_rng(0)
    actual = g.normal(size=(30, 4))
    predicted = actual.copy()
    predicted[:, 1] = -actual[:, 1]  # one point predicted exactly backwards
    found = per_test_lds(predicted, actual)
    assert found["values"] == pytest.approx([1.0, -1.0, 1.0, 1.0])
    assert found["mean"] == pytest.approx(0.5) and found["positive"] == pytest.approx(0.75)


def test_on_a_problem_solved_to_optimality_the_lds_is_near_one(env):
    """Full-batch gradient descent to the minimiser of a convex (damped) problem, 5% removed per subset: group
    influence is additive to first order, so the predicted and measured losses rank the subsets alike."""
    cfg = compose_cfg(
        "validate-lds", [*CONVEX, "lds.subsets=10", "lds.alpha=0.95", "lds.baselines=[identity]", "lds.threads=1"]
    )
    result = validate_lds(cfg)
    assert result.summary["subsets"] == 10
    assert result.summary["lds"]["msif"]["lds"] > 0.95, result.summary["lds"]
    assert set(result.summary["lds"]) == {"msif", "identity"}


def test_outputs_resume_and_per_test(env, tmp_path, prebuilt):
    prebuilt("influence", FAST, config="validate-lds")
    proc = ok(msif(["validate-lds", *FAST]))
    assert "linear datamodeling score" in proc.stdout
    folder = next((tmp_path / "outputs").rglob("lds.csv")).parent
    frame = pd.read_csv(folder / "lds.csv")
    assert list(frame["subset"]) == list(range(6)) and (frame["removed"] == 90).all()
    summary = json.loads((folder / "lds_summary.json").read_text())
    assert set(summary["lds"]) == {"msif", "identity", "single_stage"} and (folder / "lds.png").exists()
    # predicted effects are the sums of the left-out scores of the influence table
    scores = pd.read_parquet(next(folder.parent.glob("scores.parquet"))).set_index("index")["score"]
    j2 = removed_rows(180, 0.5, 0, 2)
    assert frame.loc[2, "predicted_effect"] == pytest.approx(-scores.loc[j2].sum() / 180)
    more = ok(msif(["validate-lds", *FAST[:1], "lds.subsets=8", *FAST[2:]]))  # two more subsets, six reused
    assert "6 done" in more.stdout and "2 to go" in more.stdout
    again = pd.read_csv(folder / "lds.csv")
    assert len(again) == 8 and again.iloc[:6].equals(frame)
    per = ok(msif(["validate-lds", *FAST, "target.per_test=true", "target.kind=indices", "target.indices=[0,1,2]"]))
    assert "per test point (3)" in per.stdout


def test_bad_settings_are_refused_before_any_work(env, tmp_path):
    refused(msif(["validate-lds", "dataset=tiny", "lds.alpha=1.5"]), "lds.alpha")
    refused(msif(["validate-lds", "dataset=tiny", "lds.baselines=[magic]"]), "lds.baselines", "magic")
    assert not any((tmp_path / "outputs").rglob("checkpoint.pt")) if (tmp_path / "outputs").exists() else True
