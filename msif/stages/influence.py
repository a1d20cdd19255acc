"""Stage 3, `msif influence`: score every pretraining example's influence on the finetune test loss (MATH.md).

Writes, in `<finetune run>/influence-<sig>/`: scores.parquet (and scores.csv on request), summary.json (written
last: its presence marks a finished run), score_histogram.png and, for image data, influence_grid.png.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from msif import distributed
from msif.console import console, say, table
from msif.data import Examples, Tasks
from msif.errors import MsifError
from msif.influence import METHODS, MultiStageInfluence, SingleStageInfluence
from msif.influence.scoring import METHODS as SCORE_METHODS
from msif.influence.solvers import SolveReport
from msif.io import atomic_torch_save, atomic_write_bytes, atomic_write_json, atomic_write_text
from msif.runs import influence_run
from msif.stages.common import Trained, read_json, setup
from msif.stages.finetune import ensure_finetuned
from msif.stages.pretrain import ensure_pretrained

TARGET_KINDS = ("test_set", "indices", "misclassified")


@dataclass
class InfluenceResult:
    """A finished influence run: its folder, its summary, and the score table (read from disk when first used)."""

    path: Path
    summary: dict
    frame: pd.DataFrame | None = None

    @property
    def scores(self) -> pd.DataFrame:
        if self.frame is None:
            self.frame = pd.read_parquet(self.path / "scores.parquet")
        return self.frame


def influence(cfg: DictConfig, tasks: Tasks | None = None) -> InfluenceResult:
    """Compute (or reuse) the influence table these settings name."""
    _check_settings(cfg)
    env = setup(cfg, tasks)
    single = is_single_stage(cfg)
    with distributed.main_first():  # under torchrun, process 0 makes a missing upstream stage; the others load it
        if single:  # classic one-model influence on the pretrained network: no finetune stage involved
            pre = fin = ensure_pretrained(cfg, env.tasks)
        else:
            pre, fin = ensure_finetuned(cfg, env.tasks)
    run = influence_run(cfg, fin.run)
    if distributed.broadcast_from_main(run.complete and not cfg.force):
        if not distributed.is_main():
            return InfluenceResult(run.path, read_json(run.path / "summary.json"))
        say(f"influence: reusing the finished run {run.path} (same settings; force=true recomputes)")
        result = InfluenceResult(run.path, read_json(run.path / "summary.json"))
        _write_extras(cfg, run.path, result.scores, env.tasks, result.summary, fresh=False)
        _report(cfg, result.scores, result.summary, run.path)
        return result

    start = time.perf_counter()
    pre_set, test = env.tasks.pretrain.train, target_set(cfg, env.tasks)
    pred = predict(fin, test, env.device, cfg.train.eval_batch_size)
    targets = select_targets(cfg.target, test, pred)
    score_rows = select_rows(cfg.score.indices, len(pre_set))
    say(
        f"influence ({label(cfg)}): {cfg.dataset.name}, m={len(pre_set):,} pretraining examples "
        f"({len(score_rows):,} scored), target T = {len(targets):,} test points ({cfg.target.kind}"
        f"{', per test point' if cfg.target.per_test else ', summed'}), solver {cfg.solver.pretrain.method}"
    )
    msi = (
        build_single_stage(cfg, pre, env.tasks, env.device)
        if single
        else build_influence(cfg, pre, fin, env.tasks, env.device)
    )
    partial = run.path / "partial"  # solved vectors and score parts of an unfinished run: a rerun resumes from them
    partial.mkdir(parents=True, exist_ok=True)
    S = solve_targets(cfg, msi, test.x[targets], test.y[targets], partial)
    scores = score_in_parts(msi, S, score_rows, int(cfg.score.part_rows), partial)  # (rows, K); None off process 0
    if not distributed.is_main():
        distributed.barrier()  # until process 0 has written the table
        return InfluenceResult(run.path, read_json(run.path / "summary.json"))
    frame = score_table(scores, score_rows, pre_set, targets if cfg.target.per_test else None, test, pred)
    _write_parquet(frame, run.path / "scores.parquet")
    summary = {
        "stage": "influence",
        "mode": cfg.mode,
        "case": None if single else cfg.case.name,
        "alpha": cfg.case.get("alpha") if cfg.case.name == "updated" and not single else None,
        "dataset": cfg.dataset.name,
        "m": len(pre_set),
        "n": None if single else len(env.tasks.finetune.train),
        "scored": len(score_rows),
        "target": {
            "kind": cfg.target.kind,
            "per_test": bool(cfg.target.per_test),
            "size": len(targets),
            "test_indices": targets.tolist() if len(targets) <= 1000 else None,
        },
        "parameters": msi.parameter_counts(),
        "hessian_sample": {"pretrain": len(msi.hessian_index), "finetune": None if single else msi.H_F.n},
        "seconds": {k: round(v, 3) for k, v in msi.trace.seconds.items()}
        | {"total": round(time.perf_counter() - start, 3)},
        "solves": [r.as_dict() for r in msi.trace.solves],
        "scoring": msi.trace.scoring,
        "score_stats": _stats(frame["score"].to_numpy()),
        "settings": run.settings,
        "device": str(env.device),
        "processes": distributed.world_size(),
        "pretrain_run": str(pre.run.path),
        "finetune_run": None if single else str(fin.run.path),
        "finetune_test_accuracy": None if single else fin.metrics.get("test", {}).get("accuracy"),
        "target_test_accuracy": fin.metrics.get("test", {}).get("accuracy"),
    }
    _write_extras(cfg, run.path, frame, env.tasks, summary)
    atomic_write_text(OmegaConf.to_yaml(cfg, resolve=True), run.path / "config.yaml")
    atomic_write_json(summary, run.path / "summary.json")  # last: marks the run finished
    shutil.rmtree(partial, ignore_errors=True)
    distributed.barrier()
    _report(cfg, frame, summary, run.path)
    return InfluenceResult(run.path, summary, frame)


def solve_targets(cfg: DictConfig, msi, x_T: torch.Tensor, y_T: torch.Tensor, partial: Path) -> torch.Tensor:
    """The solved vectors s (K, p) for the targets, in blocks of `target.chunk` test points (per-test) or one
    (summed). Each block is saved in `partial/` with its timings and solver reports as it is solved, so an
    interrupted run resumes without solving it again."""
    per_test = bool(cfg.target.per_test)
    hessians = ("pretrain",) if is_single_stage(cfg) else ("pretrain", "finetune")
    cheap = all(cfg.solver[h].method in ("lowrank", "identity") for h in hessians)  # no per-target solve to save
    chunk = int(cfg.target.chunk) if per_test and not cheap else len(y_T)
    blocks = []
    for j, i in enumerate(range(0, len(y_T), chunk)):
        file = partial / f"targets-{j:05d}.pt"
        if distributed.broadcast_from_main(file.exists()):  # every process takes the same branch
            saved = torch.load(file, map_location="cpu", weights_only=True)
            for step, sec in saved["seconds"].items():
                msi.trace.seconds[step] = msi.trace.seconds.get(step, 0.0) + sec
            msi.trace.solves.extend(SolveReport(**r) for r in saved["solves"])
            blocks.append(saved["S"].to(msi.device))
            continue
        before, solves0 = dict(msi.trace.seconds), len(msi.trace.solves)
        S = msi.target_vectors(x_T[i : i + chunk], y_T[i : i + chunk], per_test=per_test)
        seconds = {k: v - before.get(k, 0.0) for k, v in msi.trace.seconds.items()}
        solves = [dict(r.__dict__) for r in msi.trace.solves[solves0:]]
        if distributed.is_main():
            atomic_torch_save({"S": S.detach().cpu(), "seconds": seconds, "solves": solves}, file)
        blocks.append(S)
    return torch.cat(blocks)


def score_in_parts(msi, S: torch.Tensor, rows: torch.Tensor, part_rows: int, partial: Path) -> torch.Tensor:
    """Scores (len(rows), K), computed `part_rows` pretraining examples at a time; each part is saved in `partial/`
    when done (a rerun skips the finished parts), so an interruption loses at most one part of work. Under torchrun
    process r scores parts r, r + N, ...; process 0 gathers them and returns the whole (the others return None)."""
    starts = list(range(0, len(rows), part_rows))
    mine = {}
    for j in distributed.shard(list(range(len(starts)))):
        i, file = starts[j], partial / f"scores-{j:05d}.pt"
        if file.exists():
            mine[j] = torch.load(file, map_location="cpu", weights_only=True)["scores"]
            continue
        part = msi.score(S, rows[i : i + part_rows])
        atomic_torch_save({"scores": part, "rows": rows[i : i + part_rows].clone()}, file)
        mine[j] = part
    gathered = distributed.gather_to_main(mine)
    if gathered is None:
        return None
    parts = {j: t for d in gathered for j, t in d.items()}
    return torch.cat([parts[j] for j in range(len(starts))])


def build_influence(cfg: DictConfig, pre: Trained, fin: Trained, tasks: Tasks, device) -> MultiStageInfluence:
    """The influence computation these settings describe, over the trained networks and the tasks' data."""
    msi = MultiStageInfluence(
        pre.net,
        fin.net,
        tasks.pretrain.train,
        tasks.finetune.train,
        case=cfg.case.name,
        alpha=float(cfg.case.get("alpha") or 0.0),
        solver=OmegaConf.to_container(cfg.solver, resolve=True),
        hessian_sample=cfg.hessian.pretrain_sample,
        finetune_hessian_sample=cfg.hessian.finetune_sample,
        sample_seed=cfg.hessian.seed,
        batch_size=cfg.hessian.batch_size,
        device=device,
        score_method=cfg.score.method,
    )
    keep_curvature(msi.H_G, pre)
    keep_curvature(msi.H_F, fin)
    budget_graphs(cfg, msi.H_G, msi.H_F, getattr(msi, "H_F_full", None))
    return msi


def budget_graphs(cfg: DictConfig, *hessians) -> None:
    """hessian.graph_budget_gib: how much memory kept gradient graphs may take (msif.influence.hessian; 0: none)."""
    budget = cfg.hessian.get("graph_budget_gib")
    for H in hessians:
        if H is not None and budget is not None:
            H.graph_budget = int(float(budget) * 2**30)


def keep_curvature(H, trained: Trained) -> None:
    """Curvature fitted on H (solver=lowrank) is cached next to the checkpoint H is taken at, for every later run."""
    H.cache_dir = trained.run.path / "curvature"


MODES = ("multi_stage", "single_stage")


def is_single_stage(cfg: DictConfig) -> bool:
    return cfg.get("mode", "multi_stage") == "single_stage"


def require_multi_stage(cfg: DictConfig, stage: str, why: str) -> None:
    """Refuse mode=single_stage in a stage that only makes sense for the two-stage model."""
    if is_single_stage(cfg):
        raise MsifError(
            f"{stage} {why}, so it uses multi-stage influence, but mode={cfg.mode} was given.",
            "Drop mode= (the default is mode=multi_stage).",
        )


def label(cfg: DictConfig) -> str:
    return "single-stage" if is_single_stage(cfg) else f"case {cfg.case.name}"


def target_set(cfg: DictConfig, tasks: Tasks) -> Examples:
    """The test set T is drawn from: the finetune task's (multi-stage) or the pretraining task's (single-stage)."""
    return tasks.pretrain.test if is_single_stage(cfg) else tasks.finetune.test


def build_single_stage(cfg: DictConfig, pre: Trained, tasks: Tasks, device) -> SingleStageInfluence:
    """Classic influence of the pretraining examples on the pretrained network's own test loss (Koh & Liang)."""
    ssi = SingleStageInfluence(
        pre.net,
        tasks.pretrain.train,
        solver=OmegaConf.to_container(cfg.solver.pretrain, resolve=True),
        hessian_sample=cfg.hessian.pretrain_sample,
        sample_seed=cfg.hessian.seed,
        batch_size=cfg.hessian.batch_size,
        device=device,
        score_method=cfg.score.method,
    )
    keep_curvature(ssi.H, pre)
    budget_graphs(cfg, ssi.H)
    return ssi


def _check_settings(cfg: DictConfig) -> None:
    if cfg.get("mode", "multi_stage") not in MODES:
        raise MsifError(f"Unknown influence mode '{cfg.mode}'.", f"Use mode= one of {list(MODES)}.")
    for side in ("finetune", "pretrain"):
        method = cfg.solver[side].get("method")
        if method not in METHODS:
            raise MsifError(
                f"Unknown IHVP solver '{method}' (solver.{side}.method).",
                f"Use one of {list(METHODS)}: solver=<name> for both Hessians, or solver.{side}.method=<name>.",
            )
    if cfg.score.method not in SCORE_METHODS:
        raise MsifError(f"Unknown score.method '{cfg.score.method}'.", f"Use one of {list(SCORE_METHODS)}.")
    if cfg.target.kind not in TARGET_KINDS:
        raise MsifError(f"Unknown target kind '{cfg.target.kind}'.", f"Use target.kind= one of {list(TARGET_KINDS)}.")


def select_rows(indices, size: int, what: str = "score.indices", of: str = "pretraining set") -> torch.Tensor:
    """Validated row indices into a set of `size` rows (all rows when `indices` is None)."""
    if indices is None:
        return torch.arange(size)
    rows = list(indices) if not isinstance(indices, int) else [indices]
    bad = [i for i in rows if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < size]
    if not rows or bad:
        raise MsifError(
            f"{what} contains {bad[:5] if bad else 'nothing'}: not rows of the {of} (0..{size - 1}).",
            f"List row indices between 0 and {size - 1}, as the `index` column of the tables shows.",
        )
    if len(set(rows)) != len(rows):
        raise MsifError(f"{what} lists some rows more than once.", "List each row once.")
    return torch.tensor(rows)


@torch.no_grad()
def predict(fin: Trained, test: Examples, device, batch_size: int) -> torch.Tensor:
    """The finetuned model's predicted label for every finetune test example."""
    net = fin.net.to(device).eval()
    chunks = [net(test.x[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(test), batch_size)]
    fin.net.cpu()
    return torch.cat(chunks)


def select_targets(target: DictConfig, test: Examples, pred: torch.Tensor) -> torch.Tensor:
    """Rows of the finetune test set that make up T (`pred`: the finetuned model's predictions)."""
    if target.kind == "test_set":
        rows = torch.arange(len(test))
    elif target.kind == "indices":
        if target.indices is None:
            raise MsifError("target.kind=indices needs target.indices.", "Pass e.g. target.indices=[0,5,17].")
        rows = select_rows(target.indices, len(test), "target.indices", "finetune test set")
    else:
        rows = torch.nonzero(pred != test.y).flatten()
        if len(rows) == 0:
            raise MsifError(
                "target.kind=misclassified, but the finetuned model classifies every test example correctly.",
                "Use target.kind=test_set or target.indices=[...].",
            )
    if target.max_points is not None:
        rows = rows[: int(target.max_points)]
    return rows


def score_table(
    scores: torch.Tensor,
    rows: torch.Tensor,
    pre_set: Examples,
    targets: torch.Tensor | None,
    test: Examples,
    pred: torch.Tensor,
) -> pd.DataFrame:
    """The long table: one row per (pretraining example, target). See README, "Score table"."""
    m = len(pre_set)
    names = np.array(pre_set.class_names)
    labels = pre_set.y[rows].numpy()
    base = {
        "index": rows.numpy(),
        "source_index": pre_set.source_index[rows].numpy(),
        "label": labels,
        "class_name": names[labels],
    }
    frames = []
    for k in range(scores.shape[1]):
        s = scores[:, k].double().numpy()
        f = pd.DataFrame(base)
        if targets is not None:
            t = int(targets[k])
            f.insert(0, "test_index", t)
            f.insert(1, "test_source_index", int(test.source_index[t]))
            f.insert(2, "test_label", int(test.y[t]))
            f.insert(3, "test_class_name", test.class_names[int(test.y[t])])
            f.insert(4, "test_prediction", test.class_names[int(pred[t])])
        f["score"] = s
        f["predicted_removal_effect"] = -s / m
        f["rank"] = pd.Series(s).rank(ascending=False, method="first").astype(int).to_numpy()
        frames.append(f)
    return pd.concat(frames, ignore_index=True)


def _stats(s: np.ndarray) -> dict:
    return {
        "mean": float(s.mean()),
        "mean_abs": float(np.abs(s).mean()),
        "std": float(s.std()),
        "min": float(s.min()),
        "max": float(s.max()),
        "positive_fraction": float((s > 0).mean()),
    }


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    import io

    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    atomic_write_bytes(buf.getvalue(), path)


def _write_extras(
    cfg: DictConfig, path: Path, frame: pd.DataFrame, tasks: Tasks, summary: dict, fresh: bool = True
) -> None:
    """scores.csv (on request) and the pictures: written for a fresh computation, and for a reused run when
    missing (so `output.csv=true` on a finished run adds the CSV)."""

    def wanted(name: str) -> bool:
        return fresh or not (path / name).exists()

    if cfg.output.csv and wanted("scores.csv"):
        atomic_write_text(frame.to_csv(index=False), path / "scores.csv")
    if not cfg.output.plots:
        return
    from msif import plots

    if wanted("score_histogram.png"):
        title = (
            f"{cfg.dataset.name}, {label(cfg)}: influence of {summary.get('scored', len(frame)):,} pretraining examples"
        )
        plots.score_histogram({label(cfg): frame["score"].to_numpy()}, path / "score_histogram.png", title)
    if len(tasks.input_shape) == 3 and wanted("influence_grid.png"):
        _grid(cfg, path, frame, tasks)


def _grid(cfg: DictConfig, path: Path, frame: pd.DataFrame, tasks: Tasks) -> None:
    """The paper's Figure 4: most harmful and most helpful pretraining images, per target test image if per-test."""
    from msif import plots

    norm = cfg.dataset.get("normalize")
    mean, std = (norm.mean, norm.std) if norm is not None else (None, None)
    pre, test = tasks.pretrain.train, target_set(cfg, tasks)

    def cells(f: pd.DataFrame, kind: str) -> list:
        return [
            (
                plots.to_image(pre.x[int(i)], mean, std),
                f"#{int(i)} {pre.class_names[int(pre.y[int(i)])]}\nI={score:.3g}",
                kind,
            )
            for i, score in zip(f["index"], f["score"], strict=True)
        ]

    if "test_index" not in frame:
        k = int(cfg.output.top_k)
        ordered = frame.sort_values("score", ascending=False)
        rows = [
            ("most harmful\n(largest I)", cells(ordered.head(k), "harmful")),
            ("most helpful\n(smallest I)", cells(ordered.tail(k)[::-1], "helpful")),
        ]
        what = f"the summed test loss L_T ({cfg.target.kind})"
    else:
        k = min(int(cfg.output.top_k), 5)
        rows = []
        for t, f in list(frame.groupby("test_index", sort=False))[:8]:
            ordered = f.sort_values("score", ascending=False)
            caption = f"test #{int(t)}\ntrue {f['test_class_name'].iloc[0]}, pred. {f['test_prediction'].iloc[0]}"
            target = (plots.to_image(test.x[int(t)], mean, std), caption, "target")
            rows.append(
                (
                    f"test #{int(t)}",
                    [target, *cells(ordered.head(k), "harmful"), *cells(ordered.tail(k)[::-1], "helpful")],
                )
            )
        what = f"each target test image (blue), {k} most harmful (red), {k} most helpful (green)"
    plots.influence_grid(
        rows,
        path / "influence_grid.png",
        f"{cfg.dataset.name}, {label(cfg)}: pretraining images by influence on {what}",
    )


def _report(cfg: DictConfig, frame: pd.DataFrame, summary: dict, path: Path) -> None:
    k = int(cfg.output.top_k)
    f = frame if "test_index" not in frame else frame[frame["test_index"] == frame["test_index"].iloc[0]]
    f = f.sort_values("score", ascending=False)
    rows = [
        ["harmful", int(r.index), r.class_name, r.score, r.predicted_removal_effect] for r in f.head(k).itertuples()
    ]
    rows += [
        ["helpful", int(r.index), r.class_name, r.score, r.predicted_removal_effect]
        for r in f.tail(k)[::-1].itertuples()
    ]
    which = "" if "test_index" not in frame else f" for test point {int(f['test_index'].iloc[0])}"
    console.print(
        table(
            f"most harmful and most helpful pretraining examples{which}",
            ["", "index", "class", "score I", "ΔL_T if removed ≈ −I/m"],
            rows,
        )
    )
    solves = summary.get("solves", [])
    sec = summary.get("seconds", {})
    order = ["gradients", "ihvp1", "mixed_term", "ihvp2", "ihvp", "scoring", "total"]
    steps = [k for k in order if k in sec] or order
    console.print(table("timings (s)", steps, [[f"{sec.get(s, 0.0):.2f}" for s in steps]]))
    if solves:
        console.print(
            table(
                "IHVP solves",
                ["Hessian", "method", "damping", "iterations", "HVPs", "residual", "‖Hx−b‖/‖b‖"],
                [
                    [
                        r["label"],
                        r["method"],
                        r["damping"],
                        r["iterations"],
                        r["hvps"],
                        f"{r['residual']:.2e}",
                        "-" if r["inverse_residual"] is None else f"{r['inverse_residual']:.2e}",
                    ]
                    for r in _merge_solves(solves)
                ],
            )
        )
    say(f"scores: {path / 'scores.parquet'} ({len(frame):,} rows)")


def _merge_solves(solves: list[dict]) -> list[dict]:
    """One row per Hessian: worst residual, summed iterations and HVPs over the target blocks."""
    out: dict[str, dict] = {}
    for r in solves:
        o = out.setdefault(r["label"], dict(r, iterations=0, hvps=0, residual=0.0, inverse_residual=None))
        o["iterations"] += r["iterations"]
        o["hvps"] += r["hvps"]
        o["residual"] = max(o["residual"], r["residual"])
        if r["inverse_residual"] is not None:
            o["inverse_residual"] = max(o["inverse_residual"] or 0.0, r["inverse_residual"])
    return list(out.values())
