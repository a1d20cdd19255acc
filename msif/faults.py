"""Planted faults: a use-case check with a known answer (`msif planted-faults`).

A seeded fraction of the pretraining labels is changed to another class (msif.data.tasks.flip_labels), both stages
are retrained on the damaged set, and the influence scores are asked to find the damage: the share of the flipped
examples among the top q of the pretraining set by score (harmful first; q = 10% is the figure Kronfluence reports
for single-stage mislabel detection), the whole curve of fraction inspected against fraction found, and the same
by |score|. A random ordering finds q of them in the top q. The baseline a user would try first, the damaged
pretrained model's own loss on each example (a flipped label is one it finds hard), is ranked the same way, so the
table shows what the multi-stage scores add to it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch

CURVE_POINTS = 200


def recovery(
    scores: pd.DataFrame,
    flipped: np.ndarray,
    m: int,
    inspect: list[float],
    baselines: Mapping[str, np.ndarray] | None = None,
) -> dict:
    """The share of the flipped rows among the top q·m pretraining examples, for each q in `inspect`, ordered by
    score (largest first: the harmful end), by |score|, and by each baseline (name -> one value per pretraining row,
    largest first: `by_<name>`); with the curve over q in (0, 1]."""
    flipped = np.asarray(flipped, dtype=np.int64)
    is_flipped = np.zeros(m, dtype=bool)
    is_flipped[flipped] = True
    rows = scores.sort_values("index")
    index, values = rows["index"].to_numpy(), rows["score"].to_numpy(np.float64)
    out: dict = {"flipped": len(flipped), "m": m, "inspect": [float(q) for q in inspect]}
    grid = np.linspace(1 / CURVE_POINTS, 1.0, CURVE_POINTS)
    orderings = [("by_score", -values), ("by_abs_score", -np.abs(values))]
    orderings += [(f"by_{name}", -np.asarray(v, dtype=np.float64)[index]) for name, v in (baselines or {}).items()]
    out["baselines"] = list(baselines or {})
    for name, key in orderings:
        order = index[np.lexsort((index, key))]  # ties by row, so the ordering is reproducible
        found = np.cumsum(is_flipped[order]) / max(len(flipped), 1)
        out[name] = {f"{q:g}": _found_at(found, q, m) for q in inspect}
        out[f"{name}_curve"] = [_found_at(found, q, m) for q in grid]
    out["curve_inspected"] = grid.tolist()
    return out


def _found_at(found: np.ndarray, q: float, m: int) -> float:
    """The share found among the top round(q·m) (at least one) examples."""
    return float(found[max(1, int(round(q * m))) - 1])


def fault_table(scores: pd.DataFrame, examples, flipped: np.ndarray) -> pd.DataFrame:
    """One row per pretraining example: its score, rank (1 = most harmful), label used, true label, flipped."""
    frame = scores[["index", "score"]].sort_values("index").reset_index(drop=True)
    frame["rank"] = frame["score"].rank(ascending=False, method="first").astype(int)
    frame["label"] = examples.y[frame["index"].to_numpy()].numpy()
    frame["true_label"] = examples.true_y[frame["index"].to_numpy()].numpy()
    frame["flipped"] = np.isin(frame["index"].to_numpy(), flipped)
    return frame


def pretrain_losses(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> np.ndarray:
    """Each example's loss under `net` in eval mode (the objective's per-example cross-entropy), on the labels it was
    trained with, the flipped ones included: the loss baseline of the planted-fault check."""
    from msif.influence.params import example_losses

    was = net.training
    net.eval()
    with torch.no_grad():
        out = [example_losses(net(x[i : i + batch_size]), y[i : i + batch_size]) for i in range(0, len(y), batch_size)]
    net.train(was)
    return torch.cat(out).double().numpy()
