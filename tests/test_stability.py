"""Stability of the scores under the Hessian sample, and the reliability verdict `msif influence` ends with."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from msif.stability import agreement, overall, reliability
from tests.helpers.cli import msif, ok

TINY = ["dataset=tiny", "output.plots=false"]


def frame(scores) -> pd.DataFrame:
    return pd.DataFrame({"index": np.arange(len(scores)), "score": np.asarray(scores, dtype=float)})


def test_agreement_against_an_independent_computation():
    g = np.random.default_rng(0)
    a = g.normal(size=1000)
    b = a + 0.5 * g.normal(size=1000)
    found = agreement(frame(a), frame(b)[::-1], top=100)  # row order does not matter: matched by index
    assert found["pearson_r"] == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-12)
    ranks = lambda v: np.argsort(np.argsort(v))  # noqa: E731  (no ties in continuous draws)
    assert found["spearman_rho"] == pytest.approx(np.corrcoef(ranks(a), ranks(b))[0, 1], abs=1e-12)
    top_abs = lambda v: set(np.argsort(-np.abs(v))[:100])  # noqa: E731
    assert found["top_overlap_abs"] == len(top_abs(a) & top_abs(b))
    assert agreement(frame(a), frame(a))["top_overlap_abs"] == 100
    assert agreement(frame(a), frame(-a))["pearson_r"] == pytest.approx(-1.0)
    assert agreement(frame(a[:50]), frame(a[:50]), top=100)["top"] == 25  # at most half the examples
    with pytest.raises(ValueError, match="same pretraining examples"):
        agreement(frame(a), frame(a[:10]))


def solve(label, residual, method="lanczos"):
    """A solve as summary.json records it (SolveReport.as_dict)."""
    from msif.influence.solvers import SolveReport

    return SolveReport(label, method, 0.01, residual=residual, system="(H² + λI) x = H b").as_dict()


def test_the_verdict_names_what_is_poor_and_what_to_do():
    summary = {"solves": [solve("finetune", 0.2), solve("pretrain", 1e-7)]}
    checks = reliability(summary, {"pearson_r": 0.5, "spearman_rho": 0.4, "top": 100, "top_overlap_abs": 30}, None)
    by = {c.what.split(" ")[0]: c for c in checks}
    assert by["finetune"].verdict == "poor" and "solver.finetune.iterations" in by["finetune"].advice
    assert by["pretrain"].verdict == "good" and not by["pretrain"].advice
    assert by["stability"].verdict == "poor" and "hessian.pretrain_sample" in by["stability"].advice
    assert by["leave-one-out"].verdict == "unknown"
    assert overall(checks) == "poor"
    good = reliability(
        {"solves": [solve("pretrain", 1e-8)]},
        {"pearson_r": 0.99, "spearman_rho": 0.98, "top": 100, "top_overlap_abs": 90},
        {"pearson_r": 0.9, "n": 50, "ceiling": 0.95},
    )
    assert overall(good) == "good" and "ceiling 0.95" in good[-1].value


def test_check_stability_scores_an_independent_sample_and_keeps_the_agreement(env, tmp_path, prebuilt):
    prebuilt("finetune", TINY[:1])
    args = ["influence", *TINY, "check.stability=true", "hessian.pretrain_sample=90", "hessian.finetune_sample=60"]
    proc = ok(msif(args))
    assert "stability: r = " in proc.stdout and "reliability" in proc.stdout
    files = list((tmp_path / "outputs").rglob("stability.json"))
    assert len(files) == 1
    found = json.loads(files[0].read_text())
    assert found["seeds"] == [0, 1] and found["top"] == 90 and -1 <= found["pearson_r"] <= 1
    runs = sorted(p.parent.name for p in (tmp_path / "outputs").rglob("influence-*/summary.json"))
    assert found["other_run"] in runs and len(runs) == 2  # this run and the one on hessian.seed=1
    from msif.runs import read_json

    a = pd.read_parquet(files[0].parent / "scores.parquet")
    b = pd.read_parquet(files[0].parent.parent / found["other_run"] / "scores.parquet")
    assert read_json(files[0]) == found
    assert found["pearson_r"] == pytest.approx(
        np.corrcoef(a["score"], b.set_index("index").loc[a["index"], "score"])[0, 1]
    )
    again = ok(msif(args))
    assert f"stability: r = {found['pearson_r']:.3f}" in again.stdout
    assert json.loads(files[0].read_text()) == found


def test_with_every_example_in_both_hessians_there_is_no_sample_to_vary(env, prebuilt):
    prebuilt("finetune", TINY[:1])
    proc = ok(msif(["influence", *TINY, "check.stability=true"]))  # tiny: both Hessians over all examples
    assert "no sample can change the scores" in proc.stdout and "exact: both Hessians sum over every" in proc.stdout
    checks = reliability({"solves": []}, {"full_sample": True}, None)
    assert [c.verdict for c in checks if c.what == "stability"] == ["good"]
