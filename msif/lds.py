"""The linear datamodeling score (LDS; Park et al. 2023, "TRAK"), the evaluation TRAK, Kronfluence and dattri use.

Draw M random subsets S_j of the pretraining set, each keeping round(α·m) examples; retrain both stages on each
(warm-started from the trained weights like the leave-one-out retrains, the removed examples weighted zero); and
take the Spearman correlation over j between the measured L_T(S_j) and the predicted group effect of removing the
rest, Σ_{z∉S_j} −I(z, T)/m (docs/MATH.md: removal is ε = −1/m per example, to first order additive). Per test
point, the same with each point's loss and its per-test scores.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from msif.loo import _spearman, correlation


def removed_rows(m: int, alpha: float, seed: int, j: int) -> np.ndarray:
    """The pretraining rows left out of subset j (sorted): all but round(α·m), drawn from (seed, j)."""
    keep = int(round(alpha * m))
    perm = np.random.default_rng([int(seed), int(j)]).permutation(m)
    return np.sort(perm[keep:]).astype(np.int64)


def group_effect(scores: np.ndarray, removed: np.ndarray, m: int) -> np.ndarray:
    """Σ_{z removed} −I(z, T)/m: for a score vector (m,) a number, for per-test scores (m, K) one per test point."""
    return -scores[removed].sum(0) / m


def score_matrix(table: pd.DataFrame, m: int) -> tuple[np.ndarray, list[int] | None]:
    """Scores as (m,) for a summed table, (m, K) for a per-test one (columns in test_index order)."""
    if "test_index" not in table:
        s = table.set_index("index")["score"].reindex(range(m))
        if s.isna().any():
            raise ValueError("LDS needs a score for every pretraining example (score.indices=null)")
        return s.to_numpy(np.float64), None
    wide = table.pivot(index="index", columns="test_index", values="score").reindex(range(m))
    if wide.isna().any().any():
        raise ValueError("LDS needs a score for every pretraining example (score.indices=null)")
    return wide.to_numpy(np.float64), [int(c) for c in wide.columns]


def lds(predicted: np.ndarray, actual: np.ndarray, seed: int = 0, resamples: int = 2000) -> dict:
    """The LDS (Spearman ρ over subsets) with its BCa bootstrap interval, and Pearson r, from msif.loo.correlation."""
    out = correlation(predicted, actual, seed, resamples)
    return {"lds": out["spearman_rho"], "lds_ci95": out["spearman_rho_ci95"], **out}


def per_test_lds(predicted: np.ndarray, actual: np.ndarray) -> dict:
    """Spearman ρ over subsets for each test point (columns of (M, K) arrays): mean, median, quartiles."""
    rho = np.asarray(_spearman(predicted.T, actual.T, axis=-1), dtype=np.float64)
    finite = rho[np.isfinite(rho)]
    q = np.quantile(finite, [0.1, 0.25, 0.5, 0.75, 0.9]) if len(finite) else [float("nan")] * 5
    return {
        "points": len(rho),
        "mean": float(finite.mean()) if len(finite) else float("nan"),
        "quantiles": dict(zip(["10%", "25%", "50%", "75%", "90%"], [float(v) for v in q], strict=True)),
        "positive": float((finite > 0).mean()) if len(finite) else float("nan"),
        "values": [float(v) for v in rho],
    }
