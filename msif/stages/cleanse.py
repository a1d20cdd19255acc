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
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from msif.cleanse import CONDITIONS, compare_conditions, harmful_rows, random_rows, retrain_without
from msif.config import signature, to_plain
from msif.console import console, say, table
from msif.data import Tasks
from msif.errors import MsifError
from msif.io import KEEP, append_csv_row, atomic_write_json, atomic_write_text, read_resumable_csv
from msif.stages.common import Setup, run_jobs, setup, threads_per_worker
from msif.stages.finetune import ensure_finetuned
from msif.stages.influence import influence, require_multi_stage

COLUMNS = ["seed", "condition", "removed", "test_accuracy", "test_loss", "pretrain_test_accuracy", "seconds"]
STARTS = ("scratch", "warm")


@dataclass
class CleanseResult:
    path: Path
    table: pd.DataFrame
    summary: dict


def cleanse(cfg: DictConfig, tasks: Tasks | None = None) -> CleanseResult:
    """Retrain without the top `cleanse.fraction` positive-influence examples (and the controls), per seed."""
    seeds = _check(cfg)
    env = setup(cfg, tasks)
    pre, _ = ensure_finetuned(cfg, env.tasks)
    scores = influence(cfg, env.tasks)
    pre_set = env.tasks.pretrain.train
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
    start = str(cfg.cleanse.start)
    settings = {
        "influence": scores.path.name,
        "cleanse": {
            k: v
            for k, v in cfg.cleanse.items()
            if k not in ("seeds", "grid", "workers", "threads") + (("warm_steps",) * (start != "warm"))
        },
    }
    path = scores.path / f"cleanse-{signature(settings)}"
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(OmegaConf.to_yaml(cfg, resolve=True), path / "config.yaml")
    randoms = {s: random_rows(m, count, int(cfg.cleanse.random_seed), s) for s in seeds}
    _write_removed(path / "removed.csv", removal.rows, randoms, pre_set, scores.scores)

    csv = path / "cleanse.csv"
    done = _read_finished(csv)
    todo = [(s, c) for s in seeds for c in CONDITIONS if not ((done["seed"] == s) & (done["condition"] == c)).any()]
    say(
        f"cleanse ({cfg.case.name}, {start} start): remove {count:,} of m={m:,} pretraining examples "
        f"({100 * count / m:.1f}%, largest positive I) or {count:,} at random, retrain both stages, seeds {seeds}; "
        f"{len(done)} retrains already in {csv}, {len(todo)} to go"
    )
    if not csv.exists():
        atomic_write_text(",".join(COLUMNS) + "\n", csv)
    rows = done.to_dict("records")
    jobs = [(s, cond, removal.rows if cond == "harmful" else randoms[s]) for s, cond in todo]
    for s, cond, result in _run(cfg, env, pre, jobs, start):  # as each retrain finishes
        rows.append({"seed": s, "condition": cond, "removed": 0 if cond == "none" else count, **result})
        append_csv_row(csv, COLUMNS, rows[-1])

    frame = pd.DataFrame(rows, columns=COLUMNS)
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
        "settings": to_plain(settings),
    }
    from msif import plots

    plots.cleanse_bars(
        summary,
        path / "cleanse.png",
        f"{cfg.dataset.name}, case {cfg.case.name}: finetune test accuracy after removing {count:,} of {m:,} "
        f"pretraining examples ({len(seeds)} seeds)",
    )
    if len(env.tasks.input_shape) == 3 and cfg.output.plots:
        _grid(cfg, path, removal.rows[: int(cfg.cleanse.grid)], scores.scores, env.tasks)
    atomic_write_json(summary, path / "cleanse_summary.json")
    _report(summary, path)
    return CleanseResult(path, frame, summary)


_LABELS = {
    "none": "no removal",
    "harmful": "most harmful removed",
    "random": "as many removed at random",
}


def _check(cfg: DictConfig) -> list[int]:
    c = cfg.cleanse
    require_multi_stage(cfg, "cleanse", "retrains and measures the finetuned model")
    if cfg.target.per_test:
        raise MsifError(
            "cleanse removes examples harmful to one summed target L_T, but target.per_test=true was given.",
            "Drop target.per_test (choose T with target.kind / target.indices instead).",
        )
    if not 0 < float(c.fraction) < 1:
        raise MsifError(f"cleanse.fraction must be between 0 and 1, got {c.fraction}.", "The paper removes 10%: 0.1.")
    if c.start not in STARTS:
        raise MsifError(f"Unknown cleanse.start '{c.start}'.", f"Use one of {list(STARTS)}.")
    if c.start == "warm" and not (isinstance(c.warm_steps, int) and c.warm_steps > 0):
        raise MsifError(
            f"cleanse.start=warm needs a positive cleanse.warm_steps, got {c.warm_steps!r}.",
            "E.g. cleanse.warm_steps=500.",
        )
    seeds = to_plain(c.seeds)
    seeds = [seeds] if isinstance(seeds, int) else seeds
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise MsifError(
            f"cleanse.seeds must be a list of distinct integers, got {c.seeds!r}.", "E.g. cleanse.seeds=[0,1,2]."
        )
    return seeds


def _run(cfg: DictConfig, env, pre, jobs: list, start: str):
    """Yield (seed, condition, result) as retrains finish, here or in `cleanse.workers` processes (spawned, each
    with `cleanse.threads` torch threads, so the numbers do not depend on the number of workers)."""
    workers = int(cfg.cleanse.get("workers", 1))
    threads = threads_per_worker(cfg.cleanse.get("threads"), workers)

    def here(s: int, cond: str, removed: np.ndarray) -> tuple[int, str, dict]:
        say(f"cleanse: seed {s}, {_LABELS[cond]}")
        return s, cond, _retrain(cfg, env, pre, s, cond, removed, start)

    if workers > 1:
        say(f"cleanse: {len(jobs)} retrains in {workers} processes, {threads} thread(s) each")
    for s, cond, result in run_jobs(
        jobs, workers, threads, here, cfg, _init_worker, partial(_retrain_in_worker, start=start)
    ):
        if workers > 1:
            say(f"cleanse: finished seed {s}, {_LABELS[cond]}")
        yield s, cond, result


_WORKER: tuple | None = None


def _init_worker(cfg: DictConfig, env: Setup) -> None:
    global _WORKER
    pre, _ = ensure_finetuned(cfg, env.tasks)
    _WORKER = (cfg, env, pre)


def _retrain_in_worker(seed: int, cond: str, removed: np.ndarray, start: str) -> tuple[int, str, dict]:
    cfg, env, pre = _WORKER
    return seed, cond, _retrain(cfg, env, pre, seed, cond, removed, start)


def _retrain(cfg: DictConfig, env, pre, seed: int, cond: str, removed: np.ndarray, start: str) -> dict:
    """One retrain. From scratch, no removal is the ordinary pretrain + finetune with that seed, so those run
    folders are used (and made when missing): the seed of the influence run is the very model that was scored."""
    if cond == "none" and start == "scratch":
        seeded = copy.deepcopy(cfg)
        seeded.seed = seed
        p, f = ensure_finetuned(seeded, env.tasks)
        return {
            "test_accuracy": f.metrics["test"]["accuracy"],
            "test_loss": f.metrics["test"]["loss"],
            "pretrain_test_accuracy": p.metrics["test"]["accuracy"],
            "seconds": p.metrics.get("seconds", 0.0) + f.metrics.get("seconds", 0.0),
        }
    return retrain_without(
        cfg,
        env.tasks,
        removed if cond != "none" else np.zeros(0, dtype=np.int64),
        seed,
        env.device,
        env.dtype,
        start=start,
        pretrained=pre.net,
        warm_steps=cfg.cleanse.warm_steps,
    )


def _write_removed(file: Path, harmful: np.ndarray, randoms: dict, pre_set, scores: pd.DataFrame) -> None:
    score = scores.set_index("index")["score"]
    names = np.array(pre_set.class_names)
    parts = [("harmful", None, harmful)] + [("random", s, r) for s, r in randoms.items()]
    frames = []
    for cond, seed, rows in parts:
        labels = pre_set.y[rows].numpy()
        frames.append(
            pd.DataFrame(
                {
                    "condition": cond,
                    "seed": pd.array([seed] * len(rows), dtype="Int64"),
                    "index": rows,
                    "source_index": pre_set.source_index[rows].numpy(),
                    "label": labels,
                    "class_name": names[labels],
                    "score": score.loc[rows].to_numpy(),
                }
            )
        )
    atomic_write_text(pd.concat(frames, ignore_index=True).to_csv(index=False), file)


def _read_finished(csv: Path) -> pd.DataFrame:
    if not csv.exists():
        return pd.DataFrame(columns=COLUMNS)
    frame = read_resumable_csv(csv, COLUMNS)
    if not set(frame["condition"]) <= set(CONDITIONS):
        raise MsifError(f"{csv} has conditions other than {list(CONDITIONS)}.", KEEP)
    if frame.duplicated(["seed", "condition"]).any() or frame[COLUMNS[3:]].isna().any().any():
        raise MsifError(f"{csv} repeats a (seed, condition) row or has empty values.", KEEP)
    return frame


def _grid(cfg: DictConfig, path: Path, rows: np.ndarray, scores: pd.DataFrame, tasks: Tasks) -> None:
    from msif import plots

    norm = cfg.dataset.get("normalize")
    mean, std = (norm.mean, norm.std) if norm is not None else (None, None)
    pre = tasks.pretrain.train
    score = scores.set_index("index")["score"]
    per_row = 8
    cells = [
        (
            plots.to_image(pre.x[int(i)], mean, std),
            f"#{int(i)} {pre.class_names[int(pre.y[int(i)])]}\nI={score[int(i)]:.3g}",
            "harmful",
        )
        for i in rows
    ]
    plots.influence_grid(
        [
            (f"removed\n{k + 1}-{min(k + per_row, len(cells))}", cells[k : k + per_row])
            for k in range(0, len(cells), per_row)
        ],
        path / "removed_grid.png",
        f"{cfg.dataset.name}: the {len(cells)} most harmful pretraining images (largest I), removed by cleanse",
    )


def _report(summary: dict, path: Path) -> None:
    cond = summary["conditions"]
    rows = [
        [
            _LABELS[c],
            cond[c]["seeds"].__len__(),
            f"{100 * cond[c]['test_accuracy_mean']:.2f}% ± {100 * cond[c]['test_accuracy_std']:.2f}",
            f"{cond[c]['test_loss_mean']:.4f} ± {cond[c]['test_loss_std']:.4f}",
        ]
        for c in CONDITIONS
        if c in cond
    ]
    console.print(
        table(
            f"cleanse: finetune test set after retraining ({summary['removed']:,} of {summary['m']:,} removed, "
            f"{summary['start']} start)",
            ["condition", "seeds", "accuracy (mean ± std)", "loss (mean ± std)"],
            rows,
        )
    )
    paired = [
        [
            name,
            f"{100 * d['test_accuracy']['mean']:+.2f} ± {100 * d['test_accuracy']['std']:.2f} points",
            f"{d['test_loss']['mean']:+.4f} ± {d['test_loss']['std']:.4f}",
        ]
        for name, d in summary["paired"].items()
    ]
    console.print(table("paired differences over the same seeds", ["", "accuracy", "loss"], paired))
    say(
        f"saved {path / 'cleanse.csv'}, {path / 'removed.csv'}, {path / 'cleanse.png'}, {path / 'cleanse_summary.json'}"
    )


__all__ = ["CleanseResult", "cleanse"]
