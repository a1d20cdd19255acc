"""How much of a ranking is a property of the model, and how much the luck of the Hessian sample.

The pretrain Hessian H_G (and the finetune one) sum over a random sample of examples. Two independent samples give
two score vectors; their agreement (Pearson r, Spearman ρ, overlap of the top examples) says how much of the ranking
the user can trust. `agreement` compares two score tables; `reliability` turns a run's residuals, its stability and
its leave-one-out r into a verdict with advice (the table `msif influence` ends with).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from msif.influence.solvers import NORMAL_SYSTEM
from msif.summaries import merge_solves

STABLE_R = 0.95  # score vectors from two Hessian samples agree this well: the ranking is the model's, not the sample's
FAIR_R = 0.8
GOOD_LOO_R = 0.6  # leave-one-out Pearson r at which the predictions are a usable guide to retraining
FAIR_LOO_R = 0.3
GOOD_RESIDUAL = 1e-3  # relative residual of the solved system below which the ranking is converged
FAIR_RESIDUAL = 3e-2  # above this the IHVP is far from its solution: the ranking is the solver's, not the system's


def overlap_size(top: int, n: int) -> int:
    """How many of the largest scores `agreement` compares: `top`, but at most half of the n examples (at least 1)."""
    return max(1, min(int(top), n // 2))


def agreement(a: pd.DataFrame, b: pd.DataFrame, top: int = 100) -> dict:
    """Pearson r, Spearman ρ and the overlap of the `top` largest |score| (and largest score) between two score
    tables over the same pretraining rows (`index`, `score`; summed targets, one row per example)."""
    x = a.set_index("index")["score"]
    y = b.set_index("index")["score"].reindex(x.index)
    if y.isna().any():
        raise ValueError("the two score tables do not score the same pretraining examples")
    top = overlap_size(top, len(x))
    xa, ya = x.to_numpy(np.float64), y.to_numpy(np.float64)

    def overlap(u: np.ndarray, v: np.ndarray) -> int:
        return len(set(np.argsort(-u, kind="stable")[:top]) & set(np.argsort(-v, kind="stable")[:top]))

    return {
        "n": len(x),
        "pearson_r": float(stats.pearsonr(xa, ya).statistic),
        "spearman_rho": float(stats.spearmanr(xa, ya).statistic),
        "top": top,
        "top_overlap_abs": overlap(np.abs(xa), np.abs(ya)),  # of the `top` largest |I| (what validate-loo probes)
        "top_overlap_harmful": overlap(xa, ya),  # of the `top` largest I (what cleansing removes)
    }


@dataclass
class Check:
    what: str
    value: str
    verdict: str  # good | fair | poor | unknown
    advice: str = ""


def reliability(summary: dict, stability: dict | None, loo: dict | None) -> list[Check]:
    """What decides whether an influence run's ranking is usable: each IHVP's residual, the agreement with an
    independent Hessian sample, and the leave-one-out r when a validate-loo run exists; with advice."""
    checks = []
    for s in merge_solves(summary.get("solves", [])):  # per Hessian, the worst residual over its target blocks
        if s["method"] == "identity":
            checks.append(Check(f"{s['label']} IHVP", "identity (no solve)", "unknown", "an ablation, not a ranking"))
            continue
        r = float(s["residual"])
        verdict = "good" if r <= GOOD_RESIDUAL else "fair" if r <= FAIR_RESIDUAL else "poor"
        damping = f"λ = {s['damping']:.3g}"
        if s.get("retrain"):  # the retrain response: a polynomial of H, no damping
            damping = f"retrain response η = {s['retrain'][0]:g}, K = {s['retrain'][1]}"
        elif s.get("relative_damping") is not None:
            damping += f" = ({s['relative_damping']:g}·|λ|max)" + ("²" if s.get("system") == NORMAL_SYSTEM else "")
        checks.append(
            Check(
                f"{s['label']} IHVP residual",
                f"{r:.1e} ({s['method']}, {damping})",
                verdict,
                ""
                if verdict == "good"
                else f"the {s['label']} solve is not converged: raise solver.{s['label']}.iterations, or the damping "
                f"(profile.relative_damping.{s['label']})",
            )
        )
    if stability is not None and stability.get("full_sample"):
        checks.append(Check("stability", "exact: both Hessians sum over every example", "good"))
    elif stability is None:
        checks.append(
            Check("stability", "not measured", "unknown", "check.stability=true scores an independent Hessian sample")
        )
    else:
        r = stability["pearson_r"]
        verdict = "good" if r >= STABLE_R else "fair" if r >= FAIR_R else "poor"
        checks.append(
            Check(
                "stability (another Hessian sample)",
                f"r = {r:.3f}, ρ = {stability['spearman_rho']:.3f}, top-{stability['top']} overlap "
                f"{stability['top_overlap_abs']}",
                verdict,
                ""
                if verdict == "good"
                else "the ranking depends on which examples the Hessian sums over: raise hessian.pretrain_sample "
                "(null = all) or the damping (profile.relative_damping.*)",
            )
        )
    if loo is None:
        checks.append(Check("leave-one-out r", "no validate-loo run", "unknown", "msif validate-loo measures it"))
    else:
        r = loo["pearson_r"]
        verdict = "good" if r >= GOOD_LOO_R else "fair" if r >= FAIR_LOO_R else "poor"
        verdict = verdict if math.isfinite(r) else "unknown"
        ceiling = loo.get("ceiling")
        value = f"r = {r:.3f} over {loo['n']} retrains" + (f" (ceiling {ceiling:.2f})" if ceiling else "")
        checks.append(
            Check(
                "leave-one-out r",
                value,
                verdict,
                ""
                if verdict == "good"
                else "the predictions do not track retraining: compare solver=identity (loo.compare=identity), and "
                "raise the damping or the Hessian sample",
            )
        )
    return checks


def overall(checks: list[Check]) -> str:
    """The worst verdict among the measured checks, and which of stability and leave-one-out r were not measured."""
    order = ["poor", "fair", "good"]
    measured = [c.verdict for c in checks if c.verdict in order]
    worst = next((v for v in order if v in measured), "unknown")
    missing = [c.what for c in checks if c.verdict == "unknown" and c.what in ("stability", "leave-one-out r")]
    return (
        f"{worst} as far as measured ({' and '.join(missing)} not measured)" if missing and worst != "poor" else worst
    )
