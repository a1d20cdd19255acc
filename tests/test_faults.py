"""Planted faults: exactly the seeded labels are flipped, and the share found agrees with an independent count."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from msif.data.tasks import Examples, flip_labels
from msif.faults import pretrain_losses, recovery
from tests.helpers.cli import msif, ok, refused


def test_flip_labels_changes_exactly_the_seeded_rows_to_another_class():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (1000,), generator=g)
    ex = Examples(torch.zeros(1000, 2), y, torch.arange(1000), ["a", "b", "c", "d"])
    out = flip_labels(ex, 0.05, seed=3)
    changed = torch.nonzero(out.y != y).flatten()
    assert torch.equal(changed, out.flipped) and len(changed) == 50
    assert torch.equal(out.true_y, y) and torch.equal(ex.y, y)  # the original is left as it was
    assert torch.equal(flip_labels(ex, 0.05, seed=3).y, out.y)  # seeded
    assert not torch.equal(flip_labels(ex, 0.05, seed=4).flipped, out.flipped)
    assert set(out.y[out.flipped].tolist()) <= {0, 1, 2, 3}
    # the wrong label is uniform over the other classes: each of the 3 others is drawn
    assert len(set(((out.y[out.flipped] - y[out.flipped]) % 4).tolist())) == 3


def test_recovery_counts_the_flipped_rows_among_the_top_scores():
    m = 100
    scores = pd.DataFrame({"index": np.arange(m), "score": np.linspace(1, -1, m)})  # row 0 most harmful
    flipped = np.array([0, 3, 50, 99])  # two in the top 5, 99 most helpful (largest |score| too)
    found = recovery(scores.sample(frac=1, random_state=0), flipped, m, [0.05, 0.1, 0.5, 1.0])
    assert found["by_score"] == {"0.05": 0.5, "0.1": 0.5, "0.5": 0.5, "1": 1.0}  # row 50 ranks 51st
    # by |score| the top 10 are rows 0, 99, 1, 98, 2, 97, 3, 96, 4, 95 (ties by row): 0, 3 and 99 of the four
    assert found["by_abs_score"]["0.05"] == 0.5 and found["by_abs_score"]["0.1"] == 0.75
    assert found["by_score_curve"][-1] == 1.0 and len(found["curve_inspected"]) == len(found["by_score_curve"])


def test_a_baseline_is_ranked_largest_first_like_the_scores():
    m = 100
    scores = pd.DataFrame({"index": np.arange(m), "score": np.zeros(m)})
    loss = np.arange(m, dtype=float)  # row 99 has the largest loss
    found = recovery(scores, np.array([99, 98, 10]), m, [0.02, 0.5], baselines={"pretrain_loss": loss})
    assert found["baselines"] == ["pretrain_loss"]
    assert found["by_pretrain_loss"] == {"0.02": pytest.approx(2 / 3), "0.5": pytest.approx(2 / 3)}
    assert found["by_pretrain_loss_curve"][-1] == 1.0


def test_pretrain_losses_are_each_rows_cross_entropy_in_eval_mode():
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.9)).train()
    x, y = torch.randn(10, 3, generator=g), torch.randint(0, 4, (10,), generator=g)
    logits = x @ net[0].weight.T + net[0].bias  # by hand, no dropout
    expected = torch.logsumexp(logits, 1) - logits[torch.arange(10), y]
    out = pretrain_losses(net, x, y, batch_size=3)
    assert np.allclose(out, expected.detach().numpy(), rtol=1e-6) and net.training  # its mode restored


def test_planted_faults_end_to_end_on_tiny(env, tmp_path):
    proc = ok(msif(["planted-faults", "dataset=tiny", "cleanse.seeds=[0]", "output.plots=false"]))
    assert "flipped of 180" in proc.stdout and "known answer" in proc.stdout and "random order" in proc.stdout
    assert "│ 10%       │" in proc.stdout and proc.stdout.count("10%") >= 2  # the inspected share, and random's
    folder = next((tmp_path / "outputs").rglob("faults_summary.json")).parent
    summary = json.loads((folder / "faults_summary.json").read_text())
    table = pd.read_csv(folder / "faults.csv")
    assert table["flipped"].sum() == 9 == summary["recovery"]["flipped"]  # round(0.05 * 180)
    assert (table.loc[table["flipped"], "label"] != table.loc[table["flipped"], "true_label"]).all()
    assert (table.loc[~table["flipped"], "label"] == table.loc[~table["flipped"], "true_label"]).all()
    top = table.nsmallest(18, "rank")  # the top 10% by score
    assert summary["recovery"]["by_score"]["0.1"] == pytest.approx(top["flipped"].sum() / 9)
    # the loss baseline: the damaged model's loss, higher on the labels it was made to learn against its inputs
    worst = table.nlargest(18, "pretrain_loss")
    assert summary["recovery"]["by_pretrain_loss"]["0.1"] == pytest.approx(worst["flipped"].sum() / 9)
    loss = table.groupby("flipped")["pretrain_loss"].mean()
    assert loss[True] > loss[False] and "by pretrain loss" in proc.stdout
    assert len(pd.read_csv(folder / "oracle.csv")) == 1 and (folder / "faults.png").stat().st_size > 5000
    assert set(summary["cleanse"]["conditions"]) == {"none", "harmful", "random"}
    # the damaged data have their own pretrain run; the clean one is untouched
    assert "label_noise" in next(folder.parents[2].glob("settings.json")).read_text()
    again = ok(msif(["planted-faults", "dataset=tiny", "cleanse.seeds=[0]", "output.plots=false"]))
    assert "flipped of 180" in again.stdout


def test_a_bad_fraction_is_refused_before_any_work(env, tmp_path):
    refused(msif(["planted-faults", "dataset=tiny", "faults.fraction=0.7"]), "faults.fraction", "0.5")
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("checkpoint.pt"))


def test_the_known_answer_is_retrained_like_the_cleansing_conditions(env, monkeypatch):
    """With cleanse.start=warm the retrain without exactly the flipped examples continues the damaged model too (the
    same protocol as the conditions it is compared with), and the start is part of the run's signature."""
    from msif.stages import faults as stage
    from tests.helpers.configs import compose_cfg

    starts, original = [], stage.retrain_without

    def recording(*args, **kwargs):
        starts.append((kwargs.get("start"), kwargs.get("pretrained") is not None))
        return original(*args, **kwargs)

    monkeypatch.setattr(stage, "retrain_without", recording)
    common = ["dataset=tiny", "cleanse.seeds=[0]", "output.plots=false", "cleanse.threads=1"]
    warm = stage.planted_faults(compose_cfg("planted-faults", [*common, "cleanse.start=warm"]))
    assert starts == [("warm", True)]
    scratch = stage.planted_faults(compose_cfg("planted-faults", common))
    assert starts[1:] == [("scratch", False)] and scratch.path != warm.path
