"""Stage `msif planted-faults`: flip a seeded fraction of the pretraining labels, train both stages on the damaged
set, score it, and measure how many of the flipped examples the scores find (msif/faults.py); then, with
`faults.cleanse`, remove the top scored ones (`msif cleanse` at the same fraction) and, as the known answer, exactly
the flipped ones, retrain, and compare finetune accuracy.

Writes, in `<influence run on the damaged data>/faults-<sig>/`: faults.csv (every pretraining example: score, rank,
label used, true label, flipped, the damaged pretrained model's loss on it), oracle.csv (one retrain without the
flipped examples per seed, resumable),
faults_summary.json (written last) and faults.png (fraction inspected against fraction found).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, open_dict

from msif.cleanse import retrain_without
from msif.config import to_plain
from msif.console import console, progress, say
from msif.errors import MsifError
from msif.faults import fault_table, pretrain_losses, recovery
from msif.io import atomic_write_json, atomic_write_text
from msif.lifecycle import Context, ResumableRows, Stage, run
from msif.runs import RunFolder
from msif.stages.cleanse import CLEANSE, CleanseResult, cleanse, seeds_of
from msif.stages.influence import INFLUENCE, InfluenceResult, influence
from msif.stages.pretrain import pretrained
from msif.summaries import faults_tables
from msif.targets import require_multi_stage


@dataclass
class FaultsResult:
    path: Path
    summary: dict


@dataclass
class Damaged:
    cfg: DictConfig  # the config with dataset.pretrain.label_noise set
    scores: InfluenceResult
    cleansed: CleanseResult | None


def damaged_config(cfg: DictConfig) -> DictConfig:
    """`cfg` with the planted faults in the pretraining data, and the cleansing fraction equal to theirs."""
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.dataset.pretrain.label_noise = {"fraction": float(cfg.faults.fraction), "seed": int(cfg.faults.seed)}
        out.cleanse.fraction = float(cfg.faults.fraction)
    return out


class PlantedFaults(Stage):
    name = "planted-faults"
    marker = "faults_summary.json"

    def check(self, cfg: DictConfig, ctx: Context) -> None:
        require_multi_stage(cfg, "planted-faults", "retrains and scores both stages")
        f = cfg.faults
        if not 0 < float(f.fraction) < 0.5:
            raise MsifError(
                f"faults.fraction must be between 0 and 0.5 (a share of the pretraining labels), got {f.fraction}.",
                "E.g. faults.fraction=0.05 (5%).",
            )
        inspect = to_plain(f.inspect)
        if not inspect or not all(isinstance(q, (int, float)) and 0 < q <= 1 for q in inspect):
            raise MsifError(
                f"faults.inspect must list shares of the pretraining set in (0, 1], got {f.inspect!r}.",
                "E.g. faults.inspect=[0.05,0.1,0.2].",
            )
        damaged = damaged_config(cfg)
        if f.cleanse:
            CLEANSE.check(damaged, ctx)
        else:
            INFLUENCE.check(damaged, ctx)

    def upstream(self, cfg: DictConfig, ctx: Context) -> Damaged:
        damaged = damaged_config(cfg)
        scores = influence(damaged, ctx, verdict=False)
        return Damaged(damaged, scores, cleanse(damaged, ctx) if cfg.faults.cleanse else None)

    def settings(self, cfg: DictConfig, up: Damaged) -> dict[str, Any]:
        return {
            "influence": up.scores.path.name,
            "faults": {k: v for k, v in cfg.faults.items()},
            "seeds": seeds_of(cfg) if cfg.faults.cleanse else None,
            # how the cleansing conditions and the known answer are retrained
            "start": (str(cfg.cleanse.start), cfg.cleanse.warm_steps) if cfg.faults.cleanse else None,
        }

    def location(self, cfg: DictConfig, up: Damaged, signature: str) -> Path:
        return up.scores.path / f"faults-{signature}"

    def load(self, cfg: DictConfig, ctx: Context, up: Damaged, folder: RunFolder, path=None) -> FaultsResult:
        from msif.runs import read_json

        return FaultsResult(folder.path, read_json(folder.path / "faults_summary.json"))

    def reused(self, cfg: DictConfig, ctx: Context, result: FaultsResult) -> None:
        for t in faults_tables(result.summary):
            console.print(t)

    def compute(self, cfg: DictConfig, ctx: Context, up: Damaged, folder: RunFolder) -> FaultsResult:
        tasks = ctx.tasks(up.cfg)
        examples = tasks.pretrain.train
        m, flipped = len(examples), np.array(examples.flipped.tolist(), dtype=np.int64)
        inspect = [float(q) for q in to_plain(cfg.faults.inspect)]
        say(
            f"planted faults: {len(flipped):,} of m={m:,} pretraining labels flipped (seed {cfg.faults.seed}); "
            f"scores from {up.scores.path}"
        )
        pre = pretrained(up.cfg, ctx)  # the damaged pretraining run the scores were computed on (reused)
        x = examples.x
        x = x.to(next(pre.net.parameters()).dtype) if x.is_floating_point() else x  # images; token ids stay ints
        losses = pretrain_losses(pre.net, x, examples.y, int(cfg.train.eval_batch_size))
        found = recovery(up.scores.scores, flipped, m, inspect, baselines={"pretrain_loss": losses})
        table = fault_table(up.scores.scores, examples, flipped)
        table["pretrain_loss"] = losses[table["index"].to_numpy()]
        atomic_write_text(table.to_csv(index=False), folder.path / "faults.csv")
        summary: dict[str, Any] = {
            "stage": "planted-faults",
            "dataset": cfg.dataset.name,
            "case": cfg.case.name,
            "fraction": float(cfg.faults.fraction),
            "seed": int(cfg.faults.seed),
            "finetune_test_accuracy": up.scores.summary.get("finetune_test_accuracy"),
            "recovery": found,
            "influence_run": str(up.scores.path),
        }
        if up.cleansed is not None:
            summary["cleanse"] = {
                "run": str(up.cleansed.path),
                "conditions": up.cleansed.summary["conditions"],
                "paired": up.cleansed.summary.get("paired"),
            }
            summary["oracle"] = self._oracle(cfg, ctx, up, pre.net, flipped, folder)
        from msif import plots

        plots.fault_curve(found, folder.path / "faults.png", f"{cfg.dataset.name}, case {cfg.case.name}")
        atomic_write_json(summary, folder.path / "faults_summary.json")
        for t in faults_tables(summary):
            console.print(t)
        say(f"saved {folder.path / 'faults.csv'}, {folder.path / 'faults.png'}, {folder.path / 'faults_summary.json'}")
        return FaultsResult(folder.path, summary)

    def _oracle(
        self, cfg: DictConfig, ctx: Context, up: Damaged, damaged_net, flipped: np.ndarray, folder: RunFolder
    ) -> dict:
        """Retrain without exactly the flipped examples, per cleansing seed: the accuracy a perfect detector gets
        (`damaged_net`, the pretrained network the scores came from, is where a warm start continues from)."""
        seeds = seeds_of(cfg)
        rows = ResumableRows(
            folder.path / "oracle.csv",
            ["seed", "test_accuracy", "test_loss", "pretrain_test_accuracy", "seconds"],
            key=["seed"],
            numeric=["seed", "test_accuracy", "test_loss", "pretrain_test_accuracy", "seconds"],
        )
        tasks = ctx.tasks(up.cfg)
        # the same start as the cleansing conditions, so the known answer is measured by the same protocol
        start = str(up.cfg.cleanse.start)
        warm = damaged_net if start == "warm" else None
        todo = [s for s in seeds if (s,) not in rows]
        with progress() as bar:
            task = bar.add_task("retrains without the flipped examples", total=len(seeds), completed=rows.done, info="")
            for s in todo:
                result = retrain_without(
                    up.cfg,
                    tasks,
                    flipped,
                    s,
                    ctx.device,
                    ctx.dtype,
                    start=start,
                    pretrained=warm,
                    warm_steps=up.cfg.cleanse.warm_steps,
                )
                rows.append({"seed": s, **result})
                bar.update(task, advance=1)
        frame = rows.frame()
        frame = frame[frame["seed"].isin(seeds)]
        acc = frame["test_accuracy"].to_numpy(float)
        return {
            "seeds": [int(s) for s in frame["seed"]],
            "test_accuracy_mean": float(acc.mean()),
            "test_accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
        }


PLANTED_FAULTS = PlantedFaults()


def planted_faults(cfg: DictConfig, ctx: Context | None = None) -> FaultsResult:
    """Plant label faults, score them, and measure how many the scores find (and what removing them recovers)."""
    return run(PLANTED_FAULTS, cfg, ctx)


__all__ = ["FaultsResult", "damaged_config", "planted_faults"]
