"""Data cleansing (paper Section 4.2): which pretraining examples to remove, a model retrained without them, and
how the conditions compare across seeds. The `msif cleanse` stage (msif/stages/cleanse.py) is a thin layer on these.

Positive I(z, T) means z raised the finetune test loss (docs/MATH.md), so the examples removed are the largest positive
scores; the control removes the same number of examples drawn at random.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from msif.data import Tasks
from msif.io import atomic_write_text
from msif.training import evaluate, finetune_from, train_pretrain_net

CONDITIONS = ("none", "harmful", "random")  # no removal, the top positive scores, the same number at random


@dataclass
class Removal:
    """The rows chosen for removal and how the choice came out."""

    rows: np.ndarray  # rows of the pretraining set, largest score first
    asked: int  # round(fraction * m)
    positive: int  # examples with a positive score (only those are removed)


def harmful_rows(scores: pd.DataFrame, fraction: float, m: int) -> Removal:
    """The round(fraction·m) pretraining rows with the largest positive I(z, T) (fewer when fewer are positive).

    `scores` is an influence table with one row per pretraining example (columns `index`, `score`)."""
    asked = int(round(fraction * m))
    ordered = scores.sort_values(["score", "index"], ascending=[False, True])
    positive = ordered[ordered["score"] > 0]
    return Removal(positive["index"].to_numpy()[:asked].astype(np.int64), asked, len(positive))


def random_rows(m: int, count: int, draw_seed: int, seed: int) -> np.ndarray:
    """`count` rows of range(m) drawn without replacement, reproducibly from (draw_seed, training seed)."""
    rng = np.random.default_rng([int(draw_seed), int(seed)])
    return np.sort(rng.choice(m, size=count, replace=False)).astype(np.int64)


def kept_rows(m: int, removed: np.ndarray) -> torch.Tensor:
    keep = np.ones(m, dtype=bool)
    keep[removed] = False
    return torch.from_numpy(np.nonzero(keep)[0])


def retrain_without(
    cfg: DictConfig,
    tasks: Tasks,
    removed: np.ndarray,
    seed: int,
    device,
    dtype,
    *,
    start: str = "scratch",
    pretrained: torch.nn.Module | None = None,
    warm_steps: int | None = None,
    record: list | None = None,
) -> dict:
    """Retrain both stages without the pretraining rows `removed`; the finetune test accuracy and loss.

    start="scratch": a fresh (W, U) initialised and batched with `seed`, trained with the pretraining recipe.
    start="warm": continue `pretrained` for `warm_steps` steps on the kept rows. Either way Θ is then trained
    from a fresh initialisation as `cfg.case` says. `record` receives every pretraining batch as pretraining rows.
    """
    start_time = time.perf_counter()
    keep = kept_rows(len(tasks.pretrain.train), removed)
    warm = start == "warm"
    pre_net, _ = train_pretrain_net(
        cfg,
        tasks,
        seed,
        device,
        dtype,
        rows=keep,
        record=record,
        start=pretrained if warm else None,
        steps=int(warm_steps) if warm else None,
    )
    bs = cfg.train.eval_batch_size
    pre_test = evaluate(pre_net, (tasks.pretrain.test.x.to(device), tasks.pretrain.test.y.to(device)), bs)
    fin_net, _ = finetune_from(cfg, tasks, pre_net.embedding, seed, device, dtype)
    fin_test = evaluate(fin_net, (tasks.finetune.test.x.to(device), tasks.finetune.test.y.to(device)), bs)
    return {
        "test_accuracy": fin_test["accuracy"],
        "test_loss": fin_test["loss"],
        "pretrain_test_accuracy": pre_test["accuracy"],
        "seconds": time.perf_counter() - start_time,
    }


def compare_conditions(frame: pd.DataFrame) -> dict:
    """Mean ± std of test accuracy and loss per condition, and paired differences over the seeds all share."""
    out: dict = {"conditions": {}, "paired": {}}
    for cond, f in frame.groupby("condition", sort=False):
        out["conditions"][cond] = {
            "seeds": sorted(int(s) for s in f["seed"]),
            **{f"{metric}_{stat}": _stat(f[metric].to_numpy(), stat) for metric in _METRICS for stat in _STATS},
            **{f"{metric}_values": [float(v) for v in f[metric]] for metric in _METRICS},
        }
    wide = frame.pivot(index="seed", columns="condition", values=list(_METRICS))
    for a, b in (("harmful", "none"), ("random", "none"), ("harmful", "random")):
        if (a not in frame["condition"].values) or (b not in frame["condition"].values):
            continue
        d = {}
        for metric in _METRICS:
            diff = (wide[metric][a] - wide[metric][b]).dropna()
            d[metric] = {
                "mean": _stat(diff.to_numpy(), "mean"),
                "std": _stat(diff.to_numpy(), "std"),
                "per_seed": {int(s): float(v) for s, v in diff.items()},
                **paired_test(diff.to_numpy()),
            }
        out["paired"][f"{a} - {b}"] = d
    return out


def paired_test(diff: np.ndarray) -> dict:
    """The paired t-test of the per-seed differences (H0: mean 0; scipy.stats.ttest_1samp, two-sided) and the t
    interval of their mean; None where fewer than 2 seeds (or no spread) leave nothing to test."""
    from scipy import stats

    n = len(diff)
    spread = float(np.ptp(diff)) if n else 0.0
    if n < 2 or not np.isfinite(diff).all() or spread <= 1e-12 * max(float(np.abs(diff).max()), 1e-300):
        return {"n": n, "t": None, "p_value": None, "ci95": None}
    res = stats.ttest_1samp(diff, 0.0)
    ci = res.confidence_interval(0.95)
    return {"n": n, "t": float(res.statistic), "p_value": float(res.pvalue), "ci95": [float(ci.low), float(ci.high)]}


_METRICS = ("test_accuracy", "test_loss")
_STATS = ("mean", "std")


def _stat(v: np.ndarray, stat: str) -> float:
    if len(v) == 0:
        return float("nan")
    if stat == "mean":
        return float(np.mean(v))
    return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def write_removed(file: Path, harmful: np.ndarray, randoms: dict, pre_set, scores: pd.DataFrame) -> None:
    """removed.csv: every removed row (harmful, and the random control per seed) with its label and score."""
    score = scores.set_index("index")["score"]
    parts = [("harmful", None, harmful)] + [("random", s, r) for s, r in randoms.items()]
    frames = []
    for cond, seed, rows in parts:
        frames.append(
            pd.DataFrame(
                {
                    "condition": cond,
                    "seed": pd.array([seed] * len(rows), dtype="Int64"),
                    "index": rows,
                    "source_index": pre_set.source_index[rows].numpy(),
                    "label": pre_set.labels(rows),
                    "class_name": pre_set.label_names(rows).astype(str),
                    "score": score.loc[rows].to_numpy(),
                }
            )
        )
    atomic_write_text(pd.concat(frames, ignore_index=True).to_csv(index=False), file)


def cleanse_figures(
    cfg, tasks: Tasks, path: Path, summary: dict, rows, scores: pd.DataFrame, count, m, n_seeds
) -> None:
    """cleanse.png (accuracy and loss per condition) and, for images, removed_grid.png."""
    from msif import plots

    plots.cleanse_bars(
        summary,
        path / "cleanse.png",
        f"{cfg.dataset.name}, case {cfg.case.name}: finetune test accuracy after removing {count:,} of {m:,} "
        f"pretraining examples ({n_seeds} seeds)",
    )
    if len(tasks.input_shape) == 3 and cfg.output.plots:
        plots.removed_figure(
            rows[: int(cfg.cleanse.grid)],
            scores,
            tasks.pretrain.train,
            cfg.dataset.get("normalize"),
            path / "removed_grid.png",
            cfg.dataset.name,
        )
