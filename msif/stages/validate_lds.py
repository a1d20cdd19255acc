"""Stage `msif validate-lds`: the linear datamodeling score of the influence scores (msif/lds.py).

For M random subsets of the pretraining set (each keeping a share α), retrain both stages on the subset the way
validate-loo retrains (warm start, K_p whole passes, K_f finetune steps, the left-out examples weighted zero) and
correlate (Spearman, over subsets) the measured L_T with the predicted group effect. The same retrains score the
baselines: the identity ablation (every inverse Hessian replaced by I) and single-stage influence (the pretrained
network's own test loss), so what the multi-stage terms add is measured.

Writes, in `<influence run>/lds-<sig>/`: reference.json, lds.csv (one row per finished subset, appended, so a rerun
resumes; results do not depend on lds.workers), lds_points.csv (per-test losses, with target.per_test=true),
lds_summary.json (written last) and lds.png.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, open_dict

from msif.config import to_plain
from msif.console import console, progress, say
from msif.errors import MsifError
from msif.io import atomic_write_json
from msif.lds import group_effect, lds, per_test_lds, removed_rows, score_matrix
from msif.lifecycle import Context, ResumableRows, Stage, run, run_jobs, threads_per_worker
from msif.loo import RETRAIN_KEYS, Retrainer, paired_difference, reference_losses
from msif.runs import RunFolder
from msif.stages.influence import INFLUENCE, InfluenceResult, influence, report_reliability
from msif.stages.validate_loo import compare_config, make_retrainer
from msif.summaries import lds_table
from msif.targets import require_multi_stage

BASELINES = ("identity", "single_stage")


@dataclass
class LdsResult:
    path: Path
    table: pd.DataFrame
    summary: dict


@dataclass
class Scored:
    main: InfluenceResult
    baselines: dict[str, InfluenceResult]


def baseline_config(cfg: DictConfig, name: str) -> DictConfig:
    """The influence settings of a baseline: the identity solver, or single-stage influence on the pretraining task's
    own test set."""
    if name == "identity":
        return compare_config(cfg, "identity")
    other = copy.deepcopy(cfg)
    with open_dict(other):
        other.mode = "single_stage"
        other.target.kind, other.target.indices, other.target.per_test = "test_set", None, False
    return other


class ValidateLds(Stage):
    name = "validate-lds"
    marker = None  # always continues its table (finished subsets are skipped; lds.subsets may grow)

    def check(self, cfg: DictConfig, ctx: Context) -> None:
        require_multi_stage(cfg, "validate-lds", "retrains both stages")
        d = cfg.lds
        if not 0 < float(d.alpha) < 1:
            raise MsifError(
                f"lds.alpha must be the share of the pretraining set each subset keeps, in (0, 1); got {d.alpha}.",
                "E.g. lds.alpha=0.5 (TRAK's), or 0.95 for the 5% removal variant.",
            )
        bad = [b for b in to_plain(d.baselines) or [] if b not in BASELINES]
        if bad:
            raise MsifError(f"lds.baselines lists {bad}, which are not baselines.", f"Use some of {list(BASELINES)}.")
        if cfg.score.indices is not None or cfg.score.get("sample") is not None:
            raise MsifError(
                "validate-lds sums the scores of every left-out example, but score.indices / score.sample score "
                "only some.",
                "Drop score.indices and score.sample.",
            )
        INFLUENCE.check(cfg, ctx)

    def upstream(self, cfg: DictConfig, ctx: Context) -> Scored:
        main = influence(cfg, ctx, verdict=False)
        names = [b for b in to_plain(cfg.lds.baselines) or [] if not (b == "single_stage" and cfg.target.per_test)]
        return Scored(main, {b: influence(baseline_config(cfg, b), ctx, verdict=False) for b in names})

    def settings(self, cfg: DictConfig, up: Scored) -> dict[str, Any]:
        return {
            "influence": up.main.path.name,
            "lds": {
                k: v for k, v in cfg.lds.items() if k not in ("subsets", "workers", "threads", "bootstrap", "baselines")
            },
            "retrain": {k: cfg.loo.get(k) for k in RETRAIN_KEYS},
            "threads": cfg.lds.threads,
        }

    def location(self, cfg: DictConfig, up: Scored, signature: str) -> Path:
        return up.main.path / f"lds-{signature}"

    def compute(self, cfg: DictConfig, ctx: Context, up: Scored, folder: RunFolder) -> LdsResult:
        tasks = ctx.tasks(cfg)
        m = len(tasks.pretrain.train)
        M, alpha, seed = int(cfg.lds.subsets), float(cfg.lds.alpha), int(cfg.lds.seed)
        main, points = score_matrix(up.main.scores, m)
        summed = main if points is None else main.sum(1)
        others = {b: score_matrix(r.scores, m)[0] for b, r in up.baselines.items()}
        others = {b: (v if v.ndim == 1 else v.sum(1)) for b, v in others.items()}
        columns = ["subset", "removed", "test_loss", "actual_effect", "predicted_effect"]
        columns += [f"{b}_predicted_effect" for b in others] + ["seconds"]
        table = ResumableRows(folder.path / "lds.csv", columns, key=["subset"], numeric=columns)
        per_point = None
        if points is not None:
            per_point = ResumableRows(
                folder.path / "lds_points.csv",
                ["subset", "test_index", "loss"],
                key=["subset", "test_index"],
                numeric=["subset", "test_index", "loss"],
            )
        todo = [j for j in range(M) if (j,) not in table]
        retrainer = make_retrainer(cfg, ctx)
        steps, examples = retrainer.pretrain_schedule()
        say(
            f"validate-lds ({cfg.case.name}): {M} subsets keeping {100 * alpha:g}% of m={m:,}, K_p={steps} pretrain "
            f"steps + K_f={cfg.loo.finetune_steps} finetune steps each; {table.done} done in {table.csv}, "
            f"{len(todo)} to go"
        )
        # the reference retrain (nothing left out) under the one seed every subset is retrained with
        reference = reference_losses(retrainer, folder.path, retrainer.seeds()[:1])[0]
        workers = int(cfg.lds.workers)
        threads = threads_per_worker(cfg.lds.threads, workers)
        jobs = [(j, removed_rows(m, alpha, seed, j)) for j in todo]
        start = time.perf_counter()
        with progress() as bar:
            task = bar.add_task("LDS subset retrains", total=M, completed=table.done, info="")
            for j, losses, seconds in run_jobs(
                jobs, workers, threads, cfg, make_retrainer, retrain_subset, here=retrainer
            ):
                removed = removed_rows(m, alpha, seed, j)
                row = {
                    "subset": j,
                    "removed": len(removed),
                    "test_loss": float(losses.sum()),
                    "actual_effect": float(losses.sum()) - reference,
                    "predicted_effect": float(group_effect(summed, removed, m)),
                    **{f"{b}_predicted_effect": float(group_effect(v, removed, m)) for b, v in others.items()},
                    "seconds": seconds,
                }
                table.append(row)
                if per_point is not None:
                    for k, t in enumerate(points):
                        per_point.append({"subset": j, "test_index": t, "loss": float(losses[k])})
                frame = table.frame()
                rate = (len(table.rows) - table.done) / max(time.perf_counter() - start, 1e-9) * 60
                if len(frame) >= 3:
                    rho = lds(frame["predicted_effect"].to_numpy(), frame["actual_effect"].to_numpy(), resamples=0)
                    info = f"LDS = {rho['lds']:+.3f}  {rate:.1f} subsets/min"
                else:
                    info = f"{rate:.1f} subsets/min"
                bar.update(task, completed=len(table.rows), info=info)

        frame = table.frame()
        frame = frame[frame["subset"] < M].sort_values("subset").reset_index(drop=True)
        n_boot = int(cfg.lds.bootstrap)
        actual = frame["actual_effect"].to_numpy()
        ours = frame["predicted_effect"].to_numpy()
        scores, versus = {"msif": lds(ours, actual, seed, n_boot)}, {}
        for b in others:
            theirs = frame[f"{b}_predicted_effect"].to_numpy()
            scores[b] = lds(theirs, actual, seed, n_boot)
            versus[b] = paired_difference(ours, theirs, actual, "spearman_rho", seed, n_boot)
        summary: dict[str, Any] = {
            "stage": "validate-lds",
            "dataset": cfg.dataset.name,
            "case": cfg.case.name,
            "m": m,
            "subsets": len(frame),
            "alpha": alpha,
            "pretrain_steps": steps,
            "pretrain_examples": examples,
            "finetune_steps": int(cfg.loo.finetune_steps),
            "reference_test_loss": reference,
            "lds": scores,
            "msif_minus": versus,  # msif's LDS minus each baseline's on the same subsets, paired interval
            "retrain_seconds": {"mean": float(frame["seconds"].mean()), "total": float(frame["seconds"].sum())},
            "influence_run": str(up.main.path),
            "baseline_runs": {b: str(r.path) for b, r in up.baselines.items()},
        }
        if per_point is not None:
            long = per_point.frame()
            long = long[long["subset"].isin(frame["subset"])]
            measured = long.pivot(index="subset", columns="test_index", values="loss").reindex(columns=points)
            predicted = np.stack([group_effect(main, removed_rows(m, alpha, seed, int(j)), m) for j in measured.index])
            summary["per_test"] = per_test_lds(predicted, measured.to_numpy(np.float64))
        from msif import plots

        panels = [(f"msif ({cfg.solver.pretrain.method})", frame["predicted_effect"].to_numpy(), scores["msif"])]
        panels += [(b, frame[f"{b}_predicted_effect"].to_numpy(), scores[b]) for b in others]
        plots.loo_scatter(
            panels,
            actual,
            folder.path / "lds.png",
            f"{cfg.dataset.name}, case {cfg.case.name}: LDS over {len(frame)} subsets keeping {100 * alpha:g}%",
            metric=("LDS (Spearman ρ)", "lds"),
            axes_labels=plots.LDS_AXES,
        )
        atomic_write_json(summary, folder.path / "lds_summary.json")
        console.print(lds_table(summary))
        say(f"saved {table.csv}, {folder.path / 'lds.png'}, {folder.path / 'lds_summary.json'}")
        report_reliability(up.main)
        return LdsResult(folder.path, frame, summary)


VALIDATE_LDS = ValidateLds()


def validate_lds(cfg: DictConfig, ctx: Context | None = None) -> LdsResult:
    """Retrain on M random subsets and correlate the measured test loss with the predicted group effect."""
    return run(VALIDATE_LDS, cfg, ctx)


def retrain_subset(retrainer: Retrainer, j: int, removed: np.ndarray) -> tuple[int, np.ndarray, float]:
    """(j, the loss of every target point after retraining without `removed`, seconds)."""
    import torch

    start = time.perf_counter()
    seed = retrainer.seeds()[0]
    losses = retrainer.point_losses(torch.from_numpy(removed), seed=seed).numpy()
    return j, losses, time.perf_counter() - start


__all__ = ["LdsResult", "validate_lds"]
