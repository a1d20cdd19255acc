"""`msif validate-loo`: leave-one-out retraining against predicted influence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from msif.loo import correlation
from msif.stages import validate_loo
from tests.helpers.cli import msif, ok, refused
from tests.helpers.configs import compose_cfg

FAST = ["dataset=tiny", "loo.k=4", "loo.pretrain_steps=5", "loo.finetune_steps=5", "loo.bootstrap=50"]

# Full-batch gradient descent with weight decay μ converges to the minimiser of CE + (μ/2)‖θ‖², whose Hessian is
# H_CE + μI: with the damping equal to μ and an exact solve, influence is the exact first-order effect.
CONVEX = [
    "dataset=tiny",
    "dtype=float64",
    "solver=exact",
    "response.kind=inverse",  # at the minimiser a long retrain converges: the inverse is the answer
    "solver.pretrain.normal=false",  # the minimiser's Hessian is H_CE + μI: the damped system, not the paper's
    "solver.finetune.normal=false",
    "dataset.influence.pretrain_damping=0.05",
    "dataset.influence.finetune_damping=0.05",
    "train.pretrain.optimizer=sgd",
    "train.pretrain.lr=0.5",
    "train.pretrain.weight_decay=0.05",
    "train.pretrain.batch_size=1000",
    "train.pretrain.steps=1500",
    "train.finetune.optimizer=sgd",
    "train.finetune.lr=0.5",
    "train.finetune.weight_decay=0.05",
    "train.finetune.batch_size=1000",
    "train.finetune.steps=1500",
    # retrains start at the minimiser of the full problem, 1/m away from the new one, and gradient descent closes
    # that gap by ≥ 2.5% a step: 500 steps leave 3e-6 of it (r 0.998 here, as at 1,500 steps)
    "loo.pretrain_steps=500",
    "loo.finetune_steps=500",
    "loo.k=12",
    "loo.bootstrap=200",
    "loo.repeats=1",  # full-batch gradient descent: every retrain seed gives the same retrain
    "loo.threads=1",  # 40,000 small full-batch steps: a second thread only adds OpenMP barriers (see conftest.py)
]


def test_on_a_problem_solved_to_optimality_predicted_and_actual_effects_agree(env):
    result = validate_loo(compose_cfg("validate-loo", CONVEX))
    stats = result.summary["correlation"]["msif"]
    assert stats["n"] == 12 and stats["pearson_r"] > 0.95, stats
    frame = result.table
    assert (frame["predicted_effect"] == -frame["score"] / 180).all()
    assert (frame["actual_effect"].abs() > 0).all()


# Short full-batch SGD retrains from an unconverged (Adam-trained) model: no minimum anywhere, the regime of the
# real data sets. The retrain response is their first-order effect exactly, up to how much H moves over the retrain.
SHORT = [
    "dataset=tiny",
    "dtype=float64",
    "solver=exact",
    "train.pretrain.batch_size=1000",  # the retrains' batches are the whole set: gradient descent, seed-free
    "train.finetune.batch_size=1000",
    "loo.lr=0.02",
    "loo.pretrain_steps=20",
    "loo.finetune_steps=20",
    "loo.indices=[0,11,23,35,47,59,71,83,95,107,119,131,143,155,167,179]",
    "loo.repeats=1",
    "loo.threads=1",
    "loo.bootstrap=50",
]


@pytest.mark.parametrize("case", ["fixed", "updated"])
def test_the_retrain_response_predicts_short_retrains_to_first_order_and_the_inverse_does_not(env, case):
    def fit(kind: str) -> tuple[float, float]:
        frame = validate_loo(compose_cfg("validate-loo", [*SHORT, f"case={case}", f"response.kind={kind}"])).table
        pred, act = frame["predicted_effect"].to_numpy(), frame["actual_effect"].to_numpy()
        return float(np.corrcoef(pred, act)[0, 1]), float(np.polyfit(act, pred, 1)[0])

    r, slope = fit("retrain")
    assert r > 0.999 and abs(slope - 1) < 0.03, (r, slope)  # measured: r 1.0000, slope 0.995 / 1.003
    r_inv, slope_inv = fit("inverse")  # the damped inverse answers where a converged retrain would end
    assert slope_inv > 3, (r_inv, slope_inv)


def test_the_retrain_response_falls_back_to_the_inverse_where_a_solver_cannot_apply_it_and_keeps_old_signatures(
    env,
):
    run = ok(msif(["influence", "dataset=tiny", "response.kind=retrain", "solver=cg_normal"]))
    text = " ".join(run.stdout.split())
    assert "the retrain response (response.kind=retrain) needs lanczos or exact" in text
    assert "(H² + λI) x = H b" in text  # the solve table names the system the scores did use
    refused(msif(["validate-loo", *FAST, "response.kind=retrain", "loo.lr=null"]), "response.lr is null", "loo.lr")
    from msif.config import influence_settings

    def signature(*overrides: str) -> dict:
        return influence_settings(compose_cfg("influence", ["dataset=tiny", *overrides]), "finetune-signature")

    inverse = ("response.kind=inverse",)
    assert signature(*inverse) == signature(*inverse, "response.lr=0.3")  # the inverse ignores the response block
    assert "response" not in signature(*inverse) and signature()["response"]["kind"] == "retrain"  # the default


def test_the_with_and_without_retrains_see_identical_batches_apart_from_z(env, prebuilt):
    from msif.lifecycle import Context
    from msif.loo import Retrainer
    from msif.stages.finetune import finetuned

    prebuilt("influence", FAST, upto="finetune", config="validate-loo")
    cfg = compose_cfg("validate-loo", FAST)
    s = Context(cfg)
    pre, fin = finetuned(cfg, s)
    retrainer = Retrainer(cfg, s.tasks(cfg), pre, fin, s.device, torch.arange(len(s.tasks(cfg).finetune.test)))
    with_z, without_z = [], []
    retrainer.test_loss(None, record=with_z)
    z = int(with_z[0][0])
    retrainer.test_loss(z, record=without_z)
    assert len(with_z) == len(without_z) == 5
    assert any(z in b.tolist() for b in with_z)
    for a, b in zip(with_z, without_z, strict=True):
        assert a[a != z].tolist() == b.tolist()


def test_an_interrupted_run_resumes_and_ends_with_the_same_table(env, tmp_path, prebuilt):
    prebuilt("influence", FAST, config="validate-loo")
    validate_loo(compose_cfg("validate-loo", FAST))
    csv = next((tmp_path / "outputs").rglob("loo.csv"))
    full = pd.read_csv(csv)
    lines = csv.read_text().splitlines(keepends=True)
    csv.write_text("".join(lines[:3]))  # header + two finished retrains, as if killed after the second
    (csv.parent / "loo_summary.json").unlink()
    proc = ok(msif(["validate-loo", *FAST]))
    assert "2 already done" in proc.stdout and "2 to go" in proc.stdout
    resumed = pd.read_csv(csv)
    drop = ["seconds"]  # wall time differs between runs; every number computed is identical
    pd.testing.assert_frame_equal(resumed.drop(columns=drop), full.drop(columns=drop), check_exact=True)


@pytest.mark.slow
def test_results_do_not_depend_on_the_number_of_workers(env, tmp_path, prebuilt):
    prebuilt("influence", FAST, config="validate-loo")
    # the same upstream runs in both output roots; the retrains are made afresh in each
    prebuilt("influence", FAST, into=tmp_path / "two", config="validate-loo")
    validate_loo(compose_cfg("validate-loo", [*FAST, "loo.threads=1"]))
    one = pd.read_csv(next((tmp_path / "outputs").rglob("loo.csv")))
    ok(msif(["validate-loo", *FAST, "loo.threads=1", "loo.workers=2"], {"MSIF_OUTPUTS": str(tmp_path / "two")}))
    two = pd.read_csv(next((tmp_path / "two").rglob("loo.csv")))
    pd.testing.assert_frame_equal(two.drop(columns="seconds"), one.drop(columns="seconds"), check_exact=True)


def test_outputs_and_the_identity_ablation(env, tmp_path, prebuilt):
    prebuilt("influence", FAST, config="validate-loo")
    proc = ok(msif(["validate-loo", *FAST, "loo.compare=identity"]))
    assert "Pearson r" in proc.stdout and "identity" in proc.stdout
    folder = next((tmp_path / "outputs").rglob("loo.csv")).parent
    frame = pd.read_csv(folder / "loo.csv")
    assert list(frame.columns) == [
        "index",
        "source_index",
        "label",
        "class_name",
        "exposure",
        "score",
        "predicted_effect",
        "actual_effect",
        "seconds",
        "actual_effect_r0",
        "actual_effect_r1",
        "identity_score",
        "identity_predicted_effect",
    ]
    # two retrain seeds by default, each paired with its own reference: ΔL_T is their mean
    assert (frame["actual_effect"] - (frame["actual_effect_r0"] + frame["actual_effect_r1"]) / 2).abs().max() < 1e-12
    summary = json.loads((folder / "loo_summary.json").read_text())
    assert summary["noise"]["repeats"] == 2 and len(summary["noise"]["reference_test_losses"]) == 2
    assert -1 <= summary["noise"]["test_retest_r"] <= 1
    assert set(summary["correlation"]) == {"msif", "identity"}
    assert len(summary["correlation"]["msif"]["pearson_r_ci95"]) == 2
    assert (folder / "loo.png").stat().st_size > 5000 and (folder / "reference.json").exists()
    again = ok(msif(["validate-loo", *FAST, "loo.compare=identity"]))
    assert "4 already done" in again.stdout and "0 to go" in again.stdout
    assert "noise: 2 retrain seeds" in proc.stdout and "test–retest" in proc.stdout
    # the influence run's verdict now includes this validate-loo run's r (and its noise ceiling)
    # the influence run validate-loo scored: its retrain response is that of FAST's 5 + 5 retrain steps
    verdict = ok(msif(["influence", *FAST[:1], "response.pretrain_steps=5", "response.finetune_steps=5"]))
    assert f"r = {summary['correlation']['msif']['pearson_r']:.3f} over 4 retrains" in verdict.stdout


def test_selection_mixes_the_largest_scores_with_a_seeded_random_draw():
    from omegaconf import OmegaConf

    from msif.loo import select_examples

    scores = pd.DataFrame({"index": range(100), "score": [(-1) ** i * i for i in range(100)]})
    loo = OmegaConf.create({"k": 10, "selection": "mix", "indices": None, "seed": 3})
    picked = select_examples(scores, loo, 100)
    assert picked[:5] == [99, 98, 97, 96, 95] and len(set(picked)) == 10
    assert picked == select_examples(scores, loo, 100)
    assert select_examples(scores, OmegaConf.merge(loo, {"seed": 4}), 100)[5:] != picked[5:]
    # another score table of the same examples: another top half, the same random draw wherever it can be
    other = select_examples(scores.assign(score=scores["score"].abs()[::-1].to_numpy()), loo, 100)
    assert other[:5] == [0, 1, 2, 3, 4]
    shared = [i for i in picked[5:] if i not in other[:5]]
    assert [i for i in other[5:] if i not in picked[:5]][: len(shared)] == shared


def test_correlation_matches_numpy_and_has_an_interval():
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.normal(size=40)
    b = a + rng.normal(size=40)
    out = correlation(a, b, seed=0, resamples=300)
    assert abs(out["pearson_r"] - np.corrcoef(a, b)[0, 1]) < 1e-12
    low, high = out["pearson_r_ci95"]
    assert low < out["pearson_r"] < high


@pytest.mark.parametrize(
    "args, needles",
    [
        (["loo.k=100000"], ["loo.k=100000", "between 1 and the 180 pretraining examples"]),
        (["loo.indices=[1,2,99999]"], ["99999", "not rows of the pretraining set"]),
        (["loo.compare=nope"], ["loo.compare=nope is not a solver"]),
        (["target.per_test=true"], ["one summed target"]),
    ],
)
def test_bad_loo_input_is_refused_clearly(args, needles, env, prebuilt):
    prebuilt("influence", FAST, config="validate-loo")
    refused(msif(["validate-loo", *FAST, *args]), *needles)


def test_a_row_cut_off_is_retrained_and_a_corrupt_table_is_refused_and_kept(env, tmp_path, prebuilt):
    prebuilt("influence", FAST, config="validate-loo")
    whole = validate_loo(compose_cfg("validate-loo", FAST)).table
    csv = next((tmp_path / "outputs").rglob("loo.csv"))
    broken = csv.read_text()[:-7]  # cut inside the last row: an append interrupted by a crash or a full disk
    csv.write_text(broken)
    again = validate_loo(compose_cfg("validate-loo", FAST)).table  # that row is dropped and retrained
    cols = ["index", "source_index", "label", "score", "predicted_effect", "actual_effect"]
    pd.testing.assert_frame_equal(again[cols], whole[cols], check_dtype=False)
    csv.write_text(broken + "\nnot,a,row\n")
    refused(msif(["validate-loo", *FAST]), "loo.csv", "kept as it is")
    assert csv.read_text() == broken + "\nnot,a,row\n"
    csv.write_bytes(b"\x80\x81 not text")
    refused(msif(["validate-loo", *FAST]), "not UTF-8", "kept as it is")


def test_retrains_start_from_the_trained_model_moved_by_the_pretraining_change(env, prebuilt):
    """With no retraining steps the retrain is the finetuned model itself (shifted start), in both cases."""
    prebuilt("influence", FAST, upto="finetune", config="validate-loo")
    prebuilt("finetune", [*FAST, "case=updated"], config="validate-loo")
    from msif.lifecycle import Context
    from msif.loo import Retrainer
    from msif.stages.finetune import finetuned

    for case in ("fixed", "updated"):
        cfg = compose_cfg("validate-loo", [*FAST, f"case={case}", "loo.pretrain_steps=0", "loo.finetune_steps=0"])
        s = Context(cfg)
        pre, fin = finetuned(cfg, s)
        retrainer = Retrainer(cfg, s.tasks(cfg), pre, fin, s.device, torch.arange(len(s.tasks(cfg).finetune.test)))
        assert retrainer.test_loss(None) == retrainer.original_test_loss()
    cfg = compose_cfg(
        "validate-loo",
        [*FAST, "case=updated", "loo.pretrain_steps=0", "loo.finetune_steps=0", "loo.finetune_start=pretrained"],
    )
    retrainer = Retrainer(cfg, s.tasks(cfg), pre, fin, s.device, torch.arange(len(s.tasks(cfg).finetune.test)))
    assert retrainer.test_loss(None) != retrainer.original_test_loss()  # W* instead of the finetuned W**


def _tiny_fit(removal: str, exclude: int | None, weights: list, record: list | None = None):
    from omegaconf import OmegaConf

    from msif.training import fit

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (10,), generator=g)
    t = OmegaConf.create({"optimizer": "sgd", "lr": 0.1, "weight_decay": 0.0, "batch_size": 4, "steps": 6})
    fit(model, list(model.parameters()), x, y, t, 3, "", exclude=exclude, removal=removal, weights=weights,
        record=record, show_progress=False)  # fmt: skip
    return model, x, y


def test_zero_weight_removal_gives_z_weight_zero_and_leaves_every_other_weight_at_one_over_b():
    """The influence function's removal (ε = −1/m in G) changes no other example's weight; `drop` (the mean over
    the b − 1 others) up-weights each of them by b/(b − 1)."""
    z = 7
    for removal, other in (("zero_weight", 1 / 4), ("drop", 1 / 3)):
        weights, record = [], []
        _tiny_fit(removal, z, weights, record)
        from msif.training import batch_schedule

        batches = list(batch_schedule(10, 4, 6, 3))
        hits = 0
        for idx, w, used in zip(batches, weights, record, strict=True):
            assert z not in used.tolist() and set(used.tolist()) == set(idx.tolist()) - {z}
            if z in idx.tolist():
                hits += 1
                assert float(w[idx == z]) == 0.0
                assert torch.allclose(w[idx != z], torch.full((len(idx) - 1,), other, dtype=torch.float64))
            else:
                assert torch.allclose(w, torch.full((len(idx),), 1 / len(idx), dtype=torch.float64))
        assert hits >= 2  # z was in some batches (6 steps of 4 over 10 examples: at least twice)


def test_zero_weight_removal_steps_like_the_weighted_sum_and_a_batch_without_z_like_the_reference():
    """The removed run equals SGD on Σ_{i≠z} ℓ_i / b written out by hand; with z = None it is plain SGD on the mean."""
    from msif.training import batch_schedule

    for exclude in (7, None):
        model, x, y = _tiny_fit("zero_weight", exclude, [])
        torch.manual_seed(0)
        ref = torch.nn.Linear(3, 2).double()
        for idx in batch_schedule(10, 4, 6, 3):
            keep = idx[idx != exclude] if exclude is not None else idx
            loss = torch.nn.functional.cross_entropy(ref(x[keep]), y[keep], reduction="sum") / len(idx)
            ref.zero_grad()
            loss.backward()
            with torch.no_grad():
                for p in ref.parameters():
                    p -= 0.1 * p.grad
        for a, b in zip(model.parameters(), ref.parameters(), strict=True):
            assert torch.allclose(a, b, rtol=0, atol=1e-14)


def test_whole_epochs_expose_every_example_equally_often():
    from msif.training import batch_schedule, epoch_steps, exposure

    for n, b, epochs in ((10, 4, 1), (10, 4, 3), (541, 128, 24), (24754, 512, 2)):
        steps, examples = epoch_steps(n, b, epochs)
        counts = exposure(n, b, steps, seed=5, examples=examples)
        assert (counts == epochs).all(), (n, b, epochs)
        sizes = [len(i) for i in batch_schedule(n, b, steps, 5, examples)]
        assert len(sizes) == steps and sum(sizes) == epochs * n and all(s == b for s in sizes[:-1])
    # a step count instead: 100 steps of 128 over 10,000 CIFAR examples see some examples twice, most once
    counts = exposure(10_000, 128, 100, seed=0)
    assert set(counts.unique().tolist()) == {1, 2}


def test_a_retrain_repeated_with_the_same_seed_gives_the_same_test_loss_bit_for_bit(env, prebuilt):
    from msif.lifecycle import Context
    from msif.loo import Retrainer
    from msif.stages.finetune import finetuned

    prebuilt("influence", FAST, upto="finetune", config="validate-loo")
    cfg = compose_cfg("validate-loo", [*FAST[:2], "loo.pretrain_steps=null", "loo.finetune_steps=20"])
    s = Context(cfg)
    pre, fin = finetuned(cfg, s)
    retrainer = Retrainer(cfg, s.tasks(cfg), pre, fin, s.device, torch.arange(len(s.tasks(cfg).finetune.test)))
    assert retrainer.pretrain_schedule() == (51, 18 * 180)  # the profile's 18 whole passes of 180 in batches of 64
    seed_a, seed_b = retrainer.seeds()
    for z in (None, 17):
        first, second = retrainer.test_loss(z, seed=seed_a), retrainer.test_loss(z, seed=seed_a)
        assert first == second
        assert retrainer.test_loss(z, seed=seed_b) != first  # another seed: another batch order
    assert (retrainer.exposure(seed_a) == 18).all()


def test_the_noise_ceiling_is_the_square_root_of_the_spearman_brown_reliability():
    import math

    from msif.loo import noise

    g = np.random.default_rng(0)
    signal = g.normal(size=200)
    frame = pd.DataFrame({f"actual_effect_r{i}": signal + g.normal(size=200) for i in range(2)})
    found = noise(frame, [1.0, 1.2], r=0.5)
    retest = float(np.corrcoef(frame["actual_effect_r0"], frame["actual_effect_r1"])[0, 1])
    assert found["test_retest_r"] == pytest.approx(retest, abs=1e-12)
    assert found["reliability_of_mean"] == pytest.approx(2 * retest / (1 + retest))
    assert found["ceiling"] == pytest.approx(math.sqrt(2 * retest / (1 + retest)))
    assert found["r_over_ceiling"] == pytest.approx(0.5 / found["ceiling"])
    assert found["reference_spread"] == pytest.approx(float(np.std([1.0, 1.2], ddof=1)))
    # signal variance 1, noise 1 per seed: retest ≈ 0.5, so the mean of two has reliability ≈ 2/3
    assert 0.55 < found["reliability_of_mean"] < 0.78
    assert noise(frame[["actual_effect_r0"]], [1.0], r=0.5)["ceiling"] is None


def test_retrains_measured_for_another_score_table_of_the_same_model_are_reused_not_redone(env, prebuilt, capsys):
    rows = ["loo.indices=[3,17,40,99]"]
    first = validate_loo(compose_cfg("validate-loo", [*FAST, *rows])).table.set_index("index")
    capsys.readouterr()
    # other scores (another influence run), the same retrains for three of the examples and one new
    other = [*FAST, "loo.indices=[3,17,99,120]", "response.kind=retrain", "solver=exact"]
    result = validate_loo(compose_cfg("validate-loo", other))
    second = result.table.set_index("index")
    out = " ".join(capsys.readouterr().out.split())
    assert "3 of the retrains were measured already" in out
    assert (second["score"] != first["score"].reindex(second.index)).any()  # really another score table
    for col in ("actual_effect", "actual_effect_r0", "actual_effect_r1"):
        assert (second.loc[[3, 17, 99], col] == first.loc[[3, 17, 99], col]).all()
    assert (second.loc[[3, 17, 99], "seconds"] == 0).all() and second.loc[120, "seconds"] > 0
    # the time per retrain is of the one made here, not diluted by the three reused
    assert result.summary["retrain_seconds"]["reused"] == 3
    assert result.summary["retrain_seconds"]["mean"] == pytest.approx(second.loc[120, "seconds"])
    different = validate_loo(compose_cfg("validate-loo", [*other, "loo.lr=0.01"])).table
    assert "measured already" not in capsys.readouterr().out  # other retrains: nothing reused
    assert (different["seconds"] > 0).all()
    # retrained here instead, with every other validate-loo run gone, the numbers are the same bit for bit
    import shutil

    for folder in Path(env["MSIF_OUTPUTS"]).rglob("loo-*"):
        shutil.rmtree(folder)
    again = validate_loo(compose_cfg("validate-loo", other)).table.set_index("index")
    assert "measured already" not in capsys.readouterr().out and (again["seconds"] > 0).all()
    pd.testing.assert_frame_equal(again.drop(columns="seconds"), second.drop(columns="seconds"))
