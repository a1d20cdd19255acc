"""Stage 5, `msif cleanse`: remove the most harmful pretraining examples, retrain both stages, compare accuracy
(paper Section 4.2) against no removal and against removing as many examples at random, over several seeds.

Writes, in `<influence run>/cleanse-<sig>/`: removed.csv (every removed row, per condition and seed), cleanse.csv (one
row per finished retrain, appended as each completes, so a rerun resumes and `cleanse.seeds` can grow),
cleanse_summary.json (written last), cleanse.png (accuracy and loss, mean ± std) and, for image data,
removed_grid.png (the most harmful removed images).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from msif.cleanse import (
    CONDITIONS,
    cleanse_figures,
    compare_conditions,
    harmful_rows,
    random_rows,
    retrain_without,
    write_removed,
)
from msif.config import to_plain
from msif.console import console, say
from msif.errors import MsifError
from msif.io import atomic_write_json
from msif.lifecycle import Context, ResumableRows, Stage, run, run_jobs, threads_per_worker
from msif.runs import RunFolder, Trained
from msif.stages.finetune import finetuned
from msif.stages.influence import INFLUENCE, InfluenceResult, influence
from msif.summaries import CLEANSE_LABELS, cleanse_tables
from msif.targets import require_multi_stage

COLUMNS = ["seed", "condition", "removed", "test_accuracy", "test_loss", "pretrain_test_accuracy", "seconds"]
NOT_IN_SIGNATURE = ("seeds", "grid", "workers", "threads")  # which retrains run, and how: not what each one gives


@dataclass
class CleanseResult:
    path: Path
    table: pd.DataFrame
    summary: dict


class Cleanse(Stage):
    name = "cleanse"
    marker = None  # always continues its table (finished retrains are skipped; cleanse.seeds may have grown)

    def check(self, cfg: DictConfig, ctx: Context) -> None:
        c = cfg.cleanse
        require_multi_stage(cfg, "cleanse", "retrains and measures the finetuned model")
        if cfg.target.per_test:
            raise MsifError(
                "cleanse removes examples harmful to one summed target L_T, but target.per_test=true was given.",
                "Drop target.per_test (choose T with target.kind / target.indices instead).",
            )
        if not 0 < float(c.fraction) < 1:
            raise MsifError(
                f"cleanse.fraction must be between 0 and 1, got {c.fraction}.", "The paper removes 10%: 0.1."
            )
        if c.start == "warm" and not (isinstance(c.warm_steps, int) and c.warm_steps > 0):
            raise MsifError(
                f"cleanse.start=warm needs a positive cleanse.warm_steps, got {c.warm_steps!r}.",
                "E.g. cleanse.warm_steps=500.",
            )
        seeds_of(cfg)
        INFLUENCE.check(cfg, ctx)

    def upstream(self, cfg: DictConfig, ctx: Context) -> tuple[Trained, InfluenceResult]:
        pre, _ = finetuned(cfg, ctx)
        return pre, influence(cfg, ctx, verdict=False)

    def settings(self, cfg: DictConfig, up: tuple[Trained, InfluenceResult]) -> dict[str, Any]:
        skip = NOT_IN_SIGNATURE + (("warm_steps",) if cfg.cleanse.start != "warm" else ())
        return {"influence": up[1].path.name, "cleanse": {k: v for k, v in cfg.cleanse.items() if k not in skip}}

    def location(self, cfg: DictConfig, up: tuple[Trained, InfluenceResult], signature: str) -> Path:
        return up[1].path / f"cleanse-{signature}"

    def compute(self, cfg: DictConfig, ctx: Context, up: tuple[Trained, InfluenceResult], folder: RunFolder):
        pre, scores = up
        seeds, start = seeds_of(cfg), str(cfg.cleanse.start)
        pre_set = ctx.tasks(cfg).pretrain.train
        m = len(pre_set)
        removal = harmful_rows(scores.scores, float(cfg.cleanse.fraction), m)
        if len(removal.rows) == 0:
            raise MsifError(
                "No pretraining example has a positive influence score, so there is nothing harmful to remove.",
                "Check the influence run's score table; a different target (target.kind) may have harmful examples.",
            )
        if len(removal.rows) < removal.asked:
            say(
                f"[yellow]note:[/] only {removal.positive:,} examples have a positive score, fewer than the "
                f"{removal.asked:,} asked for (cleanse.fraction={cfg.cleanse.fraction}); removing those."
            )
        count = len(removal.rows)
        randoms = {s: random_rows(m, count, int(cfg.cleanse.random_seed), s) for s in seeds}
        write_removed(folder.path / "removed.csv", removal.rows, randoms, pre_set, scores.scores)

        table = ResumableRows(
            folder.path / "cleanse.csv",
            COLUMNS,
            key=["seed", "condition"],
            numeric=COLUMNS[3:],
            valid=lambda f: (
                None if set(f["condition"]) <= set(CONDITIONS) else f"has conditions other than {list(CONDITIONS)}"
            ),
        )
        todo = [(s, c) for s in seeds for c in CONDITIONS if (s, c) not in table]
        say(
            f"cleanse ({cfg.case.name}, {start} start): remove {count:,} of m={m:,} pretraining examples "
            f"({100 * count / m:.1f}%, largest positive I) or {count:,} at random, retrain both stages, seeds {seeds}; "
            f"{table.done} retrains already in {table.csv}, {len(todo)} to go"
        )
        jobs = [(s, cond, removal.rows if cond == "harmful" else randoms[s]) for s, cond in todo]
        workers = int(cfg.cleanse.get("workers", 1))
        threads = threads_per_worker(cfg.cleanse.get("threads"), workers)
        if workers > 1:
            say(f"cleanse: {len(jobs)} retrains in {workers} processes, {threads} thread(s) each")
        here = (cfg, ctx, pre)
        for s, cond, result in run_jobs(jobs, workers, threads, cfg, retrain_state, retrain, here=here):
            say(f"cleanse: finished seed {s}, {CLEANSE_LABELS[cond]}")
            table.append({"seed": s, "condition": cond, "removed": 0 if cond == "none" else count, **result})

        frame = table.frame()
        frame = frame[frame["seed"].isin(seeds)]
        pairs = zip(frame["seed"], frame["condition"], strict=True)
        frame["order"] = [seeds.index(s) * len(CONDITIONS) + CONDITIONS.index(c) for s, c in pairs]
        frame = frame.sort_values("order").drop(columns="order").reset_index(drop=True)
        summary = {
            "stage": "cleanse",
            "dataset": cfg.dataset.name,
            "case": cfg.case.name,
            "m": m,
            "fraction": float(cfg.cleanse.fraction),
            "removed": count,
            "positive_scores": removal.positive,
            "start": start,
            "warm_steps": int(cfg.cleanse.warm_steps) if start == "warm" else None,
            "seeds": seeds,
            "random_seed": int(cfg.cleanse.random_seed),
            **compare_conditions(frame),
            "retrain_seconds": float(frame["seconds"].sum()),
            "influence_run": str(scores.path),
            "settings": to_plain(folder.settings),
        }
        cleanse_figures(cfg, ctx.tasks(cfg), folder.path, summary, removal.rows, scores.scores, count, m, len(seeds))
        atomic_write_json(summary, folder.path / "cleanse_summary.json")
        for t in cleanse_tables(summary, CONDITIONS):
            console.print(t)
        say(
            f"saved {table.csv}, {folder.path / 'removed.csv'}, {folder.path / 'cleanse.png'}, "
            f"{folder.path / 'cleanse_summary.json'}"
        )
        return CleanseResult(folder.path, frame, summary)


CLEANSE = Cleanse()


def cleanse(cfg: DictConfig, ctx: Context | None = None) -> CleanseResult:
    """Retrain without the top `cleanse.fraction` positive-influence examples (and the controls), per seed."""
    return run(CLEANSE, cfg, ctx)


def seeds_of(cfg: DictConfig) -> list[int]:
    seeds = to_plain(cfg.cleanse.seeds)
    seeds = [seeds] if isinstance(seeds, int) else seeds
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise MsifError(
            f"cleanse.seeds must be a list of distinct integers, got {cfg.cleanse.seeds!r}.",
            "E.g. cleanse.seeds=[0,1,2].",
        )
    return seeds


def retrain_state(cfg: DictConfig, ctx: Context) -> tuple[DictConfig, Context, Trained]:
    pre, _ = finetuned(cfg, ctx)
    return cfg, ctx, pre


def retrain(state: tuple, seed: int, cond: str, removed: np.ndarray) -> tuple[int, str, dict]:
    """One retrain. From scratch, no removal is the ordinary pretrain + finetune with that seed, so those run
    folders are used (and made when missing): the seed of the influence run is the very model that was scored."""
    cfg, ctx, pre = state
    start = str(cfg.cleanse.start)
    if cond == "none" and start == "scratch":
        seeded = copy.deepcopy(cfg)
        seeded.seed = seed
        p, f = finetuned(seeded, ctx)
        return (
            seed,
            cond,
            {
                "test_accuracy": f.metrics["test"]["accuracy"],
                "test_loss": f.metrics["test"]["loss"],
                "pretrain_test_accuracy": p.metrics["test"]["accuracy"],
                "seconds": p.metrics.get("seconds", 0.0) + f.metrics.get("seconds", 0.0),
            },
        )
    return (
        seed,
        cond,
        retrain_without(
            cfg,
            ctx.tasks(cfg),
            removed if cond != "none" else np.zeros(0, dtype=np.int64),
            seed,
            ctx.device,
            ctx.dtype,
            start=start,
            pretrained=pre.net,
            warm_steps=cfg.cleanse.warm_steps,
        ),
    )


__all__ = ["CleanseResult", "cleanse"]
