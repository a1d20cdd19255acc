"""Leave-one-out ground truth (docs/MATH.md, "Leave-one-out ground truth"; paper Section 4.1, Appendix B).

For a pretraining example z: continue pretraining from (W*, U*) for K_p steps without z (giving W'), then finetune
again for K_f steps from the finetuned weights moved by the pretraining change, (W** + W' − W*, Θ*) (case fixed:
W' stays frozen; case updated: it is finetuned), and
measure ΔL_T = L_T(without z) − L_T(reference). The reference is, by default, the same retrain *with* z under the
same seed, batch order and step counts (z is masked out of its batches, so no other example moves), so the two runs
differ in z alone. ΔL_T is compared with the predicted −I(z, T)/m.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from msif.config import to_plain
from msif.data import Tasks
from msif.errors import MsifError
from msif.io import atomic_write_json
from msif.runs import read_json
from msif.training import exposure, fit, retrain_schedule, train_finetune_net

if TYPE_CHECKING:
    from msif.runs import Trained


@dataclass
class Retrainer:
    """Retrains both stages from the trained weights, optionally without one pretraining example."""

    cfg: DictConfig
    tasks: Tasks
    pre: Trained
    fin: Trained
    device: torch.device
    targets: torch.Tensor  # rows of the finetune test set making up T

    def __post_init__(self):
        # The retrains' training recipe: the original one, with loo.optimizer / loo.lr when they are set.
        self.recipe = copy.deepcopy(self.cfg)
        OmegaConf.set_struct(self.recipe, False)
        for stage in ("pretrain", "finetune"):
            if self.cfg.loo.get("optimizer"):
                self.recipe.train[stage].optimizer = self.cfg.loo.optimizer
            if self.cfg.loo.get("lr") is not None:
                self.recipe.train[stage].lr = float(self.cfg.loo.lr)

    def pretrain_schedule(self) -> tuple[int, int | None]:
        """(K_p steps, examples) of the pretraining retrain: `loo.pretrain_steps` steps when given; else
        `loo.pretrain_epochs` whole passes (every example seen equally often, the last batch shorter); else the
        profile's K_p steps for the data set."""
        loo = self.cfg.loo
        return retrain_schedule(
            len(self.tasks.pretrain.train),
            int(self.recipe.train.pretrain.batch_size),
            loo.get("pretrain_steps"),
            loo.get("pretrain_epochs"),
            int(self.cfg.profile.loo[self.cfg.train.name].pretrain),
        )

    def seeds(self) -> list[int]:
        """The batch-order seed of each retrain repeat (`loo.repeats`), each with its own paired reference."""
        return [int(self.cfg.loo.seed) + 1000 * r for r in range(int(self.cfg.loo.get("repeats", 1)))]

    def exposure(self, seed: int) -> torch.Tensor:
        """How many of the pretraining retrain's batches each pretraining example appears in (under `seed`)."""
        steps, examples = self.pretrain_schedule()
        return exposure(
            len(self.tasks.pretrain.train), int(self.recipe.train.pretrain.batch_size), steps, seed, examples
        )

    def test_loss(
        self,
        exclude: int | torch.Tensor | None = None,
        record: list | None = None,
        seed: int | None = None,
        weights: list | None = None,
    ) -> float:
        """L_T after continuing pretraining K_p steps (without `exclude`, removed as `loo.removal` says) and
        finetuning K_f steps, with the batch order of `seed` (the first of `seeds()` when None)."""
        return self._target_loss(self.retrained(exclude, record, seed, weights))

    def point_losses(self, exclude: int | torch.Tensor | None = None, seed: int | None = None) -> torch.Tensor:
        """The loss of every target point (|T|,) after the same retrain as `test_loss`."""
        return self._point_losses(self.retrained(exclude, None, seed, None))

    def retrained(
        self,
        exclude: int | torch.Tensor | None = None,
        record: list | None = None,
        seed: int | None = None,
        weights: list | None = None,
    ) -> torch.nn.Module:
        """The finetuned network after the retrain of both stages (see `test_loss`)."""
        cfg, loo, dev = self.recipe, self.cfg.loo, self.device
        seed = self.seeds()[0] if seed is None else int(seed)
        pre_set, fin_set = self.tasks.pretrain.train, self.tasks.finetune.train
        pre_net = copy.deepcopy(self.pre.net).to(dev)
        steps, examples = self.pretrain_schedule()
        fit(
            pre_net,
            list(pre_net.parameters()),
            pre_set.x.to(dev),
            pre_set.y.to(dev),
            cfg.train.pretrain,
            seed,
            "",
            steps=steps,
            examples=examples,
            exclude=exclude,
            removal=loo.get("removal", "zero_weight"),
            record=record,
            weights=weights,
            show_progress=False,
        )
        # Θ starts from the finetuned Θ*; the embedding from the finetuned W** moved by the retrain's change of the
        # pretrained embedding, W** + (W' − W*) ("shifted"), or from W' itself ("pretrained"). In case fixed
        # W** = W*, so both start from W'.
        net = copy.deepcopy(self.fin.net).to(dev)
        shifted = cfg.case.name == "updated" and loo.get("finetune_start", "shifted") == "shifted"
        with torch.no_grad():
            for p, new, old in zip(
                net.embedding.parameters(),
                pre_net.embedding.parameters(),
                self.pre.net.embedding.parameters(),
                strict=True,
            ):
                if shifted:
                    p += new - old.to(dev)
                else:
                    p.copy_(new)
        train_finetune_net(
            net,
            cfg,
            fin_set.x.to(dev),
            fin_set.y.to(dev),
            seed + 1,
            steps=int(loo.finetune_steps),
            show_progress=False,
        )
        return net

    def original_test_loss(self) -> float:
        """L_T of the finetuned model as trained (the paper's plain reference)."""
        return self._target_loss(copy.deepcopy(self.fin.net).to(self.device))

    def _point_losses(self, net: torch.nn.Module) -> torch.Tensor:
        test, bs, dev = self.tasks.finetune.test, self.cfg.train.eval_batch_size, self.device
        xt, yt = test.x[self.targets], test.y[self.targets]
        with torch.no_grad():
            return torch.cat(
                [
                    F.cross_entropy(net(xt[i : i + bs].to(dev)), yt[i : i + bs].to(dev), reduction="none").cpu()
                    for i in range(0, len(yt), bs)
                ]
            )

    def _target_loss(self, net: torch.nn.Module) -> float:
        test, bs, dev = self.tasks.finetune.test, self.cfg.train.eval_batch_size, self.device
        xt, yt = test.x[self.targets], test.y[self.targets]
        with torch.no_grad():
            return float(
                sum(
                    F.cross_entropy(net(xt[i : i + bs].to(dev)), yt[i : i + bs].to(dev), reduction="sum")
                    for i in range(0, len(yt), bs)
                )
            )


SELECTIONS = ("mix", "top", "random")


def check_selection(loo: DictConfig, m: int) -> None:
    """Refuse explicit `loo.indices` that are not rows of the m pretraining examples, or a bad `k` / `selection`."""
    if loo.indices is not None:
        rows = list(loo.indices) if not isinstance(loo.indices, int) else [loo.indices]
        bad = [i for i in rows if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < m]
        if bad or not rows:
            raise MsifError(
                f"loo.indices contains {bad[:5] if bad else 'nothing'}, which are not rows of the "
                f"pretraining set (0..{m - 1}).",
                "List rows as the `index` column of scores.parquet shows them.",
            )
        if len(set(rows)) != len(rows):
            raise MsifError("loo.indices lists some rows more than once.", "List each row once.")
        return
    k = loo.k
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= m:
        raise MsifError(
            f"loo.k={k} is not a number of leave-one-out retrains between 1 and the {m} pretraining examples.",
            f"Use loo.k between 1 and {m}.",
        )
    if loo.selection not in SELECTIONS:
        raise MsifError(f"Unknown loo.selection '{loo.selection}'.", "Use mix, top or random (or loo.indices).")


def select_examples(scores: pd.DataFrame, loo: DictConfig, m: int) -> list[int]:
    """The pretraining rows to retrain without: explicit `indices`, or k chosen by `selection` (seeded).

    `mix` (default): the k/2 largest |scores|, then a uniform random draw from the rest; `top`; `random`. The draw
    walks one seeded permutation of the scored rows and skips the ones already taken, so it does not depend on the
    scores: validate-loo runs of two score tables of one model draw (nearly) the same random examples and share
    those retrains (`same_retrains`).
    """
    check_selection(loo, m)
    if loo.indices is not None:
        return list(loo.indices) if not isinstance(loo.indices, int) else [loo.indices]
    k = int(loo.k)
    by_size = scores.assign(a=scores["score"].abs()).sort_values(["a", "index"], ascending=[False, True])
    ordered = by_size["index"].to_numpy()
    if loo.selection == "top":
        return [int(i) for i in ordered[:k]]
    n_top = k // 2 if loo.selection == "mix" else 0
    top = [int(i) for i in ordered[:n_top]]
    taken = set(top)
    walk = np.random.default_rng(int(loo.seed)).permutation(np.sort(ordered))
    drawn = [int(i) for i in walk if int(i) not in taken][: k - n_top]
    return top + drawn


SELECTION_DRAW = "permutation"  # in validate-loo's signature: tables drawn by the earlier rule keep their folders


def correlation(predicted: np.ndarray, actual: np.ndarray, seed: int = 0, resamples: int = 2000) -> dict:
    """Pearson r and Spearman ρ, with BCa bootstrap 95% intervals over resampled (predicted, actual) pairs (seeded;
    scipy.stats.bootstrap, vectorised), and the least-squares slope of predicted on actual."""
    predicted, actual = np.asarray(predicted, dtype=float), np.asarray(actual, dtype=float)
    n = len(actual)
    measures = {"pearson_r": _pearson, "spearman_rho": _spearman}
    out: dict = {"n": n, **{key: float(fn(predicted, actual)) for key, fn in measures.items()}}
    for key, fn in measures.items():
        out[f"{key}_ci95"] = _bca_interval((predicted, actual), fn, seed, resamples)
    slope = np.polyfit(actual, predicted, 1) if n >= 2 and np.ptp(actual) > 0 else [float("nan")] * 2
    out["fit_slope"], out["fit_intercept"] = float(slope[0]), float(slope[1])
    return out


def paired_difference(
    ours: np.ndarray, theirs: np.ndarray, actual: np.ndarray, measure: str, seed: int = 0, resamples: int = 2000
) -> dict:
    """How much better `ours` predicts `actual` than `theirs` on the same retrains: measure(ours, actual) −
    measure(theirs, actual) (`measure`: pearson_r or spearman_rho), with a BCa 95% interval from resampling the
    retrains jointly (scipy.stats.bootstrap, paired), so the shared noise of the retrains cancels. An interval that
    excludes 0 says the two scorings differ on these retrains; one that straddles it says they cannot be told apart."""
    fn = {"pearson_r": _pearson, "spearman_rho": _spearman}[measure]
    ours, theirs, actual = (np.asarray(v, dtype=float) for v in (ours, theirs, actual))

    def diff(a, b, y, axis=-1):
        return fn(a, y, axis=axis) - fn(b, y, axis=axis)

    return {
        "measure": measure,
        "difference": float(diff(ours, theirs, actual)),
        "ci95": _bca_interval((ours, theirs, actual), diff, seed, resamples),
    }


def _bca_interval(samples: tuple, statistic, seed: int, resamples: int) -> list[float] | None:
    """The BCa 95% interval of `statistic` over paired resamples of `samples` (scipy.stats.bootstrap, vectorised,
    seeded); None for fewer than 3 pairs, no resamples, or a degenerate (non-finite) interval."""
    from scipy import stats

    if len(samples[-1]) < 3 or resamples <= 0:
        return None
    with warnings.catch_warnings():  # degenerate resamples (constant columns) give NaN, not a warning
        warnings.simplefilter("ignore")
        res = stats.bootstrap(
            samples,
            statistic,
            paired=True,
            vectorized=True,
            n_resamples=resamples,
            method="BCa",
            confidence_level=0.95,
            rng=np.random.default_rng(seed),
        )
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return [low, high] if math.isfinite(low) and math.isfinite(high) else None


def _pearson(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """Pearson's r along `axis` (scipy.stats; NaN where either side is constant), batches of resamples at once."""
    from scipy import stats

    if np.shape(a)[axis] < 2:  # one pair has no correlation
        return np.full(np.delete(np.shape(a), axis), np.nan) if np.ndim(a) > 1 else np.float64("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: NaN
        return stats.pearsonr(a, b, axis=axis).statistic


def _spearman(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman's ρ: Pearson's r of the ranks (average ranks for ties), as scipy.stats.spearmanr, along `axis`."""
    from scipy.stats import rankdata

    return _pearson(rankdata(a, axis=axis), rankdata(b, axis=axis), axis=axis)


# the loo settings a retrain's measured L_T depends on (with the finetuned model, T and the training recipe)
RETRAIN_KEYS = ("seed", "pretrain_steps", "pretrain_epochs", "finetune_steps", "removal", "optimizer", "lr",
                "finetune_start")  # fmt: skip


def retrain_key(cfg: DictConfig) -> dict:
    """What decides a leave-one-out retrain's measured L_T, apart from the finetuned model it starts from: the retrain
    settings, the seeds (`repeats`), the reference, the target T, the case and the training recipe and dtype.
    Two validate-loo runs of one finetuned model with equal keys measure the same ΔL_T for the same z, whatever
    score tables they compare it with."""
    loo = {k: cfg.loo.get(k) for k in (*RETRAIN_KEYS, "repeats", "reference")}
    if cfg.case.name == "fixed":
        loo.pop("finetune_start")  # only matters when the embedding is finetuned
    return to_plain(
        {
            "loo": loo,
            "target": {k: v for k, v in cfg.target.items() if k != "chunk"},
            "case": cfg.case.name,
            "train": cfg.train,
            "dtype": cfg.dtype,
        }
    )


def same_retrains(cfg: DictConfig, here: Path) -> list[Path]:
    """The other validate-loo folders of this finetuned model (`here` is <finetune run>/<influence run>/loo-<sig>)
    whose retrain key equals this run's: their retrains are these retrains. An unreadable config leaves that run
    out (its own problem; measure here instead)."""
    import logging

    key, found = retrain_key(cfg), []
    for other in sorted(here.parent.parent.glob("*/loo-*")):
        if other == here or not other.is_dir():
            continue
        try:
            if retrain_key(OmegaConf.load(other / "config.yaml")) == key:
                found.append(other)
        except Exception as err:  # noqa: BLE001
            logging.getLogger(__name__).info("not reusing retrains from %s: %s", other, err)
    return found


def measured_elsewhere(cfg: DictConfig, here: Path, references: list[float]) -> dict[int, dict]:
    """Retrains another validate-loo run of the same finetuned model already measured under the same retrain key
    (`same_retrains`) and the very same reference losses (bit for bit: the same retrains), by pretraining row:
    their loo.csv rows (ΔL_T per seed, seconds)."""
    import logging

    found: dict[int, dict] = {}
    effects = [f"actual_effect_r{i}" for i in range(int(cfg.loo.repeats))] if int(cfg.loo.repeats) > 1 else []
    for other in same_retrains(cfg, here):
        csv = other / "loo.csv"
        if not csv.exists() or read_json(other / "reference.json").get("test_loss") != references:
            continue
        try:  # read only: the other run may be appending to its table right now
            rows = pd.read_csv(csv, on_bad_lines="skip")
            rows = rows[["index", "actual_effect", "seconds", *effects]].dropna().astype({"index": int})
        except Exception as err:  # noqa: BLE001  (another run's unreadable table: measure here instead)
            logging.getLogger(__name__).info("not reusing retrains from %s: %s", other, err)
            continue
        for r in rows.to_dict("records"):
            found.setdefault(int(r["index"]), r | {"from": str(other)})
    return found


def reference_losses(retrainer: Retrainer, path: Path, seeds: list[int], reference: str = "retrain") -> list[float]:
    """L_T of the reference per retrain seed: the retrain with nothing removed under that seed (`reference`
    "retrain"), or the original finetuned model ("original", the same for every seed); cached in
    `path`/reference.json."""
    file = path / "reference.json"
    cached = read_json(file)
    if cached.get("reference") == reference and cached.get("seeds") == seeds and "test_loss" in cached:
        return [float(v) for v in cached["test_loss"]]
    for other in same_retrains(retrainer.cfg, path) if path.name.startswith("loo-") else []:
        # another validate-loo run of this model with the same retrain settings made these very retrains
        theirs = read_json(other / "reference.json")
        if theirs.get("reference") == reference and theirs.get("seeds") == seeds and "test_loss" in theirs:
            atomic_write_json(theirs | {"seconds": 0.0, "from": str(other)}, file)
            return [float(v) for v in theirs["test_loss"]]
    start = time.perf_counter()
    if reference == "retrain":
        losses = [retrainer.test_loss(None, seed=seed) for seed in seeds]
    else:
        losses = [retrainer.original_test_loss()] * len(seeds)
    atomic_write_json(
        {"reference": reference, "seeds": seeds, "test_loss": losses, "seconds": time.perf_counter() - start}, file
    )
    return losses


def noise(frame: pd.DataFrame, references: list[float], r: float) -> dict:
    """The noise floor and ceiling of a validate-loo run with R retrain seeds: the spread of the reference L_T over
    the seeds, the test–retest correlation of ΔL_T between seeds (mean over pairs), the reliability of the mean of R
    (Spearman–Brown) and the ceiling it puts on any predictor's r, √reliability; r / ceiling."""
    R = len(references)
    out: dict = {"repeats": R, "reference_test_losses": references}
    if R < 2:
        return out | {"ceiling": None, "note": "loo.repeats=1: the noise ceiling is not measured"}
    cols = [f"actual_effect_r{i}" for i in range(R)]
    pairs = [(a, b) for i, a in enumerate(cols) for b in cols[i + 1 :]]
    retest = float(np.mean([_pearson(frame[a].to_numpy(float), frame[b].to_numpy(float)) for a, b in pairs]))
    reliability = R * retest / (1 + (R - 1) * retest) if retest > -1 / (R - 1) else float("nan")
    ceiling = math.sqrt(reliability) if reliability > 0 else float("nan")
    return out | {
        "reference_spread": float(np.std(references, ddof=1)),
        "actual_effect_spread": float(np.mean(frame[cols].std(axis=1, ddof=1))),
        "test_retest_r": retest,
        "reliability_of_mean": reliability,
        "ceiling": ceiling,
        "r_over_ceiling": r / ceiling if ceiling and math.isfinite(ceiling) else None,
    }


def summarize(
    cfg: DictConfig, frame: pd.DataFrame, compare: str | None, reference: float, main, compared, m: int
) -> dict:
    """loo_summary.json: the correlations of predicted and actual effects, and what they were measured with."""
    actual = frame["actual_effect"].to_numpy()
    seed, n_boot = int(cfg.loo.seed), int(cfg.loo.bootstrap)
    stats = {"msif": correlation(frame["predicted_effect"].to_numpy(), actual, seed, n_boot)}
    versus = {}
    if compare:
        theirs = frame[f"{compare}_predicted_effect"].to_numpy()
        stats[compare] = correlation(theirs, actual, seed, n_boot)
        versus[compare] = paired_difference(
            frame["predicted_effect"].to_numpy(), theirs, actual, "pearson_r", seed, n_boot
        )
    return {
        "stage": "validate-loo",
        "dataset": cfg.dataset.name,
        "case": cfg.case.name,
        "k": len(frame),
        "m": m,
        "finetune_steps": int(cfg.loo.finetune_steps),
        "reference": cfg.loo.reference,
        "reference_test_loss": reference,
        "selection": cfg.loo.selection if cfg.loo.indices is None else "indices",
        "solver": to_plain(cfg.solver),
        "correlation": stats,
        "msif_minus": versus,  # msif's r minus the compared scores' r on the same retrains, paired interval
        # reused retrains (measured by another run) count 0 s here: the mean is over the ones this run made
        "retrain_seconds": {
            "mean": float(made.mean()) if len(made := frame["seconds"][frame["seconds"] > 0]) else 0.0,
            "total": float(frame["seconds"].sum()),
            "reused": int((frame["seconds"] == 0).sum()),
        },
        "influence_run": str(main.path),
        "compare_run": str(compared.path) if compared else None,
        "influence_seconds": main.summary.get("seconds", {}).get("total"),
    }


def plot(cfg: DictConfig, frame: pd.DataFrame, summary: dict, compare: str | None, path: Path) -> None:
    """loo.png: predicted against actual effects (the paper's Figure 2; with the compared solver, Figure 3)."""
    from msif import plots

    panels = [
        (f"msif ({cfg.solver.pretrain.method})", frame["predicted_effect"].to_numpy(), summary["correlation"]["msif"])
    ]
    if compare:
        panels.append(
            (f"{compare} (ablation)", frame[f"{compare}_predicted_effect"].to_numpy(), summary["correlation"][compare])
        )
    plots.loo_scatter(
        panels,
        frame["actual_effect"].to_numpy(),
        path,
        f"{cfg.dataset.name}, case {cfg.case.name}: leave-one-out retraining, k = {len(frame)}",
    )
