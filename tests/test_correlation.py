"""Pearson r, Spearman ρ and their bootstrap intervals (msif.loo.correlation) against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from msif.loo import correlation, paired_difference


def pearson(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum()))


def ranks(v):
    out = np.empty(len(v))
    out[np.argsort(v, kind="stable")] = np.arange(1, len(v) + 1)
    return out


def test_point_estimates_are_pearson_and_spearman_from_their_definitions():
    rng = np.random.default_rng(3)
    a = rng.normal(size=40)
    b = 0.6 * a + rng.normal(size=40)
    c = correlation(a, b, resamples=0)
    assert c["pearson_r"] == pytest.approx(pearson(a, b), abs=1e-12)
    assert c["spearman_rho"] == pytest.approx(pearson(ranks(a), ranks(b)), abs=1e-12)  # no ties: ranks 1..n
    slope = ((a - a.mean()) * (b - b.mean())).sum() / ((b - b.mean()) ** 2).sum()
    assert c["fit_slope"] == pytest.approx(slope, rel=1e-10)
    assert c["pearson_r_ci95"] is None


def test_the_bca_interval_agrees_with_fishers_z_interval_for_normal_data():
    """For bivariate normal pairs, Fisher's z transform gives r's 95% interval in closed form; the bootstrap's must
    be close to it (and contain the point estimate), and be reproducible from its seed."""
    rng = np.random.default_rng(0)
    n = 200
    a = rng.normal(size=n)
    b = 0.5 * a + math.sqrt(0.75) * rng.normal(size=n)
    c = correlation(a, b, seed=1, resamples=2000)
    r = c["pearson_r"]
    half = 1.959964 / math.sqrt(n - 3)
    fisher = [math.tanh(math.atanh(r) - half), math.tanh(math.atanh(r) + half)]
    low, high = c["pearson_r_ci95"]
    assert low < r < high
    assert abs(low - fisher[0]) < 0.04 and abs(high - fisher[1]) < 0.04, (c["pearson_r_ci95"], fisher)
    assert correlation(a, b, seed=1, resamples=2000)["pearson_r_ci95"] == [low, high]
    rho_low, rho_high = c["spearman_rho_ci95"]
    assert rho_low < c["spearman_rho"] < rho_high


def test_constant_predictions_give_nan_not_an_error():
    c = correlation(np.ones(6), np.arange(6.0), resamples=100)
    assert math.isnan(c["pearson_r"]) and c["pearson_r_ci95"] is None


def test_fewer_than_two_pairs_give_nan():
    """validate-loo shows the running r after every retrain, the first one included."""
    c = correlation(np.array([0.1]), np.array([0.2]), resamples=0)
    assert math.isnan(c["pearson_r"]) and math.isnan(c["spearman_rho"])


def test_the_paired_difference_is_the_difference_of_the_definitions_and_its_interval_sees_a_real_gap():
    rng = np.random.default_rng(5)
    actual = rng.normal(size=30)
    good = actual + 0.3 * rng.normal(size=30)
    poor = actual + 3.0 * rng.normal(size=30)
    for measure, fn in (("pearson_r", pearson), ("spearman_rho", lambda a, b: pearson(ranks(a), ranks(b)))):
        d = paired_difference(good, poor, actual, measure, seed=0, resamples=1000)
        assert d["difference"] == pytest.approx(fn(good, actual) - fn(poor, actual), abs=1e-12)
        low, high = d["ci95"]
        assert 0 < low < d["difference"] < high  # a clear gap: the interval excludes 0
    # two scorings that differ by noise much smaller than their shared error cannot be told apart
    near = good + 0.01 * rng.normal(size=30)
    low, high = paired_difference(good, near, actual, "pearson_r", seed=0, resamples=1000)["ci95"]
    assert low < 0 < high
    same = paired_difference(good, good, actual, "spearman_rho", seed=0, resamples=200)
    assert same["difference"] == 0.0
