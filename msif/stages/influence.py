"""Stage 3, `msif influence`: score every pretraining example's influence on the finetune test loss (docs/MATH.md).

Writes, in `<finetune run>/influence-<sig>/`: scores.parquet (and scores.csv on request), summary.json (written
last: its presence marks a finished run), score_histogram.png and, for image data, influence_grid.png. Solved
target blocks and score parts are kept in `partial/` until the run finishes, so an interrupted run resumes.
"""

from __future__ import annotations

import copy
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig, open_dict

from msif import distributed
from msif.config import influence_settings, response_solvers, solver_group, to_plain
from msif.console import console, say
from msif.errors import MsifError
from msif.influence import MultiStageInfluence, SingleStageInfluence
from msif.influence.scoring import factored
from msif.io import atomic_write_json, atomic_write_text
from msif.lifecycle import Context, Stage, run
from msif.resume import score_in_parts, solve_targets
from msif.runs import RunFolder, Trained, read_json
from msif.score_table import read_parquet, score_stats, score_table, write_parquet
from msif.stability import agreement, overall, overlap_size, reliability
from msif.stages.finetune import finetuned
from msif.stages.pretrain import pretrained
from msif.summaries import influence_tables, reliability_table
from msif.targets import check_target, is_single_stage, label, predict, scored_rows, select_targets, target_set


@dataclass
class InfluenceResult:
    """A finished influence run: its folder, its summary, and the score table (read from disk when first used)."""

    path: Path
    summary: dict
    frame: pd.DataFrame | None = None

    @property
    def scores(self) -> pd.DataFrame:
        if self.frame is None:
            self.frame = read_parquet(self.path / "scores.parquet", self.summary.get("scores_sha256"))
        return self.frame


@dataclass
class Upstream:
    pre: Trained
    fin: Trained  # the pretrained network again in single-stage mode


class Influence(Stage):
    name = "influence"
    marker = "summary.json"

    def check(self, cfg: DictConfig, ctx: Context) -> None:
        # mode, choices, ranges and the solver settings were checked with the whole config (run -> validate_config)
        tasks = ctx.tasks(cfg)
        check_target(cfg.target, target_set(cfg, tasks))
        scored_rows(cfg.score, len(tasks.pretrain.train))
        if cfg.get("embedding_params") is not None and not is_single_stage(cfg):
            check_embedding_params(cfg, tasks)

    def upstream(self, cfg: DictConfig, ctx: Context) -> Upstream:
        if is_single_stage(cfg):  # classic one-model influence on the pretrained network: no finetune stage
            pre = pretrained(cfg, ctx)
            return Upstream(pre, pre)
        return Upstream(*finetuned(cfg, ctx))

    def settings(self, cfg: DictConfig, up: Upstream) -> dict[str, Any]:
        return influence_settings(cfg, up.fin.run.signature)

    def location(self, cfg: DictConfig, up: Upstream, signature: str) -> Path:
        kind = "influence-single" if is_single_stage(cfg) else "influence"
        return up.fin.run.path / f"{kind}-{signature}"

    def load(self, cfg: DictConfig, ctx: Context, up: Upstream, folder: RunFolder, path=None) -> InfluenceResult:
        return InfluenceResult(folder.path, read_json(folder.path / "summary.json"))

    def reused(self, cfg: DictConfig, ctx: Context, result: InfluenceResult) -> None:
        write_extras(cfg, result.path, result.scores, ctx, result.summary, fresh=False)
        report(cfg, result.scores, result.summary, result.path)

    def compute(self, cfg: DictConfig, ctx: Context, up: Upstream, folder: RunFolder) -> InfluenceResult:
        tasks, single = ctx.tasks(cfg), is_single_stage(cfg)
        start = time.perf_counter()
        pre_set, test = tasks.pretrain.train, target_set(cfg, tasks)
        pred = predict(up.fin.net, test, ctx.device, cfg.train.eval_batch_size)
        targets = select_targets(cfg.target, test, pred)
        score_rows = scored_rows(cfg.score, len(pre_set))
        say(
            f"influence ({label(cfg)}): {cfg.dataset.name}, m={len(pre_set):,} pretraining examples "
            f"({len(score_rows):,} scored), target T = {len(targets):,} test points ({cfg.target.kind}"
            f"{', per test point' if cfg.target.per_test else ', summed'}), solver {cfg.solver.pretrain.method}"
        )
        if stochastic := stochastic_layers(up.fin.net):
            say(
                f"influence: the network has {stochastic}; the losses are those of eval mode (batch-norm running "
                "statistics frozen, dropout off), the function whose Hessian msif computes"
            )
        msi = build_influence(cfg, up, ctx)
        if not single and msi.held_fixed:
            say(
                f"influence: tracking {msi.parameter_counts()['W']:,} embedding parameters (embedding_params="
                f"{to_plain(cfg.embedding_params)}); {len(msi.held_fixed)} parameter tensors of the embedding are held "
                "fixed, an approximation: their part of each example's influence is left out"
            )
        partial = folder.path / "partial"  # solved vectors and score parts of an unfinished run
        if cfg.force and distributed.is_main():
            shutil.rmtree(partial, ignore_errors=True)  # force: nothing of an earlier attempt is reused
        distributed.barrier()
        partial.mkdir(parents=True, exist_ok=True)
        hessians = ("pretrain",) if single else ("pretrain", "finetune")
        no_solve = all(cfg.solver[h].method in ("lowrank", "identity") for h in hessians)  # nothing to save per block
        chunk = len(targets) if no_solve else int(cfg.target.chunk)
        per_test = bool(cfg.target.per_test)
        S = solve_targets(msi, test.x[targets], test.y[targets], targets, per_test, chunk, partial)
        # lowrank answers S = C U: score the examples against the basis U when it has fewer rows than S
        factors = factored(S, msi.trace.solves[-1]) if chunk >= len(targets) else None
        scored = S if factors is None else factors[1]
        scores = score_in_parts(msi, scored, score_rows, int(cfg.score.part_rows), partial)  # None off process 0
        if factors is not None and scores is not None:
            scores = scores @ factors[0].T.to(scores.dtype)
            say(f"influence: scored the {len(S):,} targets through the solve's {len(scored):,} basis vectors")
        if not distributed.is_main():
            distributed.barrier()  # until process 0 has written the table
            return InfluenceResult(folder.path, read_json(folder.path / "summary.json"))
        if not torch.isfinite(scores).all() or not bool(scores.abs().max() > 0):
            raise MsifError(
                f"The influence scores are {'not finite' if not torch.isfinite(scores).all() else 'all zero'}, so "
                "they rank nothing; no table is written.",
                "The trained networks are likely degenerate (a diverged or saturated training run): check the "
                "finetune run's metrics.json, or retrain with a lower learning rate.",
            )
        frame = score_table(scores, score_rows, pre_set, targets if per_test else None, test, pred)
        digest = write_parquet(frame, folder.path / "scores.parquet")
        summary = {
            "stage": "influence",
            "mode": cfg.mode,
            "case": None if single else cfg.case.name,
            "alpha": cfg.case.get("alpha") if cfg.case.name == "updated" and not single else None,
            "dataset": cfg.dataset.name,
            "m": len(pre_set),
            "n": None if single else len(tasks.finetune.train),
            "scored": len(score_rows),
            "target": {
                "kind": cfg.target.kind,
                "per_test": per_test,
                "size": len(targets),
                "test_indices": targets.tolist() if len(targets) <= 1000 else None,
            },
            "parameters": msi.parameter_counts(),
            "embedding_held_fixed": None if single else (list(msi.held_fixed) or None),
            "hessian_sample": {"pretrain": len(msi.hessian_index), "finetune": None if single else msi.H_F.n},
            "seconds": {k: round(v, 3) for k, v in msi.trace.seconds.items()}
            | {"total": round(time.perf_counter() - start, 3)},
            "seconds_reused": {k: round(v, 3) for k, v in msi.trace.reused_seconds.items()} or None,
            "solves": [r.as_dict() for r in msi.trace.solves],
            "scoring": msi.trace.scoring,
            "score_stats": score_stats(frame["score"].to_numpy()),
            "scores_sha256": digest,
            "settings": folder.settings,
            "device": str(ctx.device),
            "processes": distributed.world_size(),
            "pretrain_run": str(up.pre.run.path),
            "finetune_run": None if single else str(up.fin.run.path),
            "finetune_test_accuracy": None if single else up.fin.metrics.get("test", {}).get("accuracy"),
            "target_test_accuracy": up.fin.metrics.get("test", {}).get("accuracy"),
        }
        write_extras(cfg, folder.path, frame, ctx, summary)
        atomic_write_json(summary, folder.path / "summary.json")  # last: marks the run finished
        shutil.rmtree(partial, ignore_errors=True)
        distributed.barrier()
        report(cfg, frame, summary, folder.path)
        return InfluenceResult(folder.path, summary, frame)


INFLUENCE = Influence()


def influence(cfg: DictConfig, ctx: Context | None = None, verdict: bool = True) -> InfluenceResult:
    """Compute (or reuse) the influence table these settings name; with `check.stability`, also score an
    independent Hessian sample and record the agreement (stability.json). Ends with the reliability verdict."""
    ctx = ctx if ctx is not None else Context(cfg)
    result = run(INFLUENCE, cfg, ctx)
    stability_found = None
    if cfg.get("check") is not None and cfg.check.stability:
        stability_found = stability(cfg, ctx, result)  # on every process: under torchrun the second run is shared
    if verdict and distributed.is_main():
        report_reliability(result, stability_found)
    return result


def stability(cfg: DictConfig, ctx: Context, result: InfluenceResult) -> dict | None:
    """The agreement of this run's scores with those of the same run on an independent Hessian sample
    (`hessian.seed` + 1, both Hessians), kept in `<run>/stability.json` by the other run's folder;
    {"full_sample": True} when no Hessian is sampled (every example in both): nothing can vary; None for per-test
    targets (not measured)."""
    single = is_single_stage(cfg)
    full_pre = cfg.hessian.pretrain_sample is None or cfg.hessian.pretrain_sample >= result.summary["m"]
    n = result.summary.get("n")
    full_fin = single or cfg.hessian.finetune_sample is None or (n is not None and cfg.hessian.finetune_sample >= n)
    if full_pre and full_fin:
        say("stability: both Hessians sum over every example, so no sample can change the scores")
        return {"full_sample": True}
    if cfg.target.per_test:
        say("stability: measured on summed targets only (target.per_test=false)")
        return None
    other = copy.deepcopy(cfg)
    with open_dict(other):
        other.hessian.seed = int(cfg.hessian.seed) + 1
        other.check.stability = False
    file = result.path / "stability.json"
    saved = read_json(file) if file.exists() else {}
    say(f"stability: the same influence on an independent Hessian sample (hessian.seed={other.hessian.seed})")
    second = influence(other, ctx, verdict=False)
    if not distributed.is_main():
        return None
    if saved.get("other_run") == second.path.name and saved.get("top") == overlap_size(
        cfg.check.top, result.summary["scored"]
    ):
        found = saved
    else:
        found = agreement(result.scores, second.scores, int(cfg.check.top)) | {
            "seeds": [int(cfg.hessian.seed), int(other.hessian.seed)],
            "other_run": second.path.name,
        }
        atomic_write_json(found, file)
    say(
        f"stability: r = {found['pearson_r']:.3f}, ρ = {found['spearman_rho']:.3f}, "
        f"{found['top_overlap_abs']} of the top {found['top']} (by |I|) in common ({file})"
    )
    return found


def report_reliability(result: InfluenceResult, stability_found: dict | None = None) -> list:
    """Print (and return) the verdict: residuals, stability (this run's or a saved one), leave-one-out r (the
    newest validate-loo run of this table, if any)."""
    file = result.path / "stability.json"
    if stability_found is None and file.exists():
        stability_found = read_json(file)
    loo = None
    runs = sorted(result.path.glob("loo-*/loo_summary.json"), key=lambda f: f.stat().st_mtime)
    if runs:
        s = read_json(runs[-1])
        main = s["correlation"]["msif"]
        loo = {"pearson_r": main["pearson_r"], "n": main["n"], "ceiling": s.get("noise", {}).get("ceiling")}
    checks = reliability(result.summary, stability_found, loo)
    console.print(reliability_table(checks, overall(checks)))
    return checks


def build_influence(cfg: DictConfig, up: Upstream, ctx: Context) -> MultiStageInfluence | SingleStageInfluence:
    """The influence computation these settings describe, over the trained networks and the tasks' data. Fitted
    curvature (solver=lowrank) is cached next to the checkpoint its Hessian is taken at, for every later run."""
    tasks = ctx.tasks(cfg)
    solver = response_solvers(cfg, solver_group(cfg), len(tasks.pretrain.train))
    common = {
        "hessian_sample": cfg.hessian.pretrain_sample,
        "sample_seed": cfg.hessian.seed,
        "batch_size": cfg.hessian.batch_size,
        "device": ctx.device,
        "score_method": cfg.score.method,
    }
    if cfg.hessian.get("graph_budget_gib") is not None:
        common["graph_budget"] = int(float(cfg.hessian.graph_budget_gib) * 2**30)
    if is_single_stage(cfg):
        return SingleStageInfluence(
            up.pre.net, tasks.pretrain.train, solver=solver["pretrain"], cache_dir=curvature(up.pre), **common
        )
    return MultiStageInfluence(
        up.pre.net,
        up.fin.net,
        tasks.pretrain.train,
        tasks.finetune.train,
        case=cfg.case.name,
        alpha=float(cfg.case.get("alpha") or 0.0),
        solver=solver,
        finetune_hessian_sample=cfg.hessian.finetune_sample,
        pretrain_cache_dir=curvature(up.pre),
        finetune_cache_dir=curvature(up.fin),
        embedding_params=to_plain(cfg.get("embedding_params")),
        **common,
    )


def check_embedding_params(cfg: DictConfig, tasks) -> None:
    """The globs of `embedding_params` name parameters of the configured network's embedding (checked on an
    untrained copy, before any training)."""
    from msif.influence.params import partition
    from msif.models import build_pretrain_net

    with torch.random.fork_rng():  # building seeds torch's generator; leave the caller's as it was
        net = build_pretrain_net(cfg.model, tasks.input_shape, tasks.pretrain.num_classes, cfg.seed)
    try:
        partition(net, None, to_plain(cfg.embedding_params), "pretrain network")
    except MsifError as err:
        raise MsifError(
            f"embedding_params={to_plain(cfg.embedding_params)} does not fit model={cfg.model.name}: {err.what}",
            err.fix,
        ) from None


def curvature(trained: Trained) -> Path:
    return trained.run.path / "curvature"


def write_extras(
    cfg: DictConfig, path: Path, frame: pd.DataFrame, ctx: Context, summary: dict, fresh: bool = True
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

    title = f"{cfg.dataset.name}, {label(cfg)}"
    if wanted("score_histogram.png"):
        what = f"{title}: influence of {summary.get('scored', len(frame)):,} pretraining examples"
        plots.score_histogram({label(cfg): frame["score"].to_numpy()}, path / "score_histogram.png", what)
    tasks = ctx.tasks(cfg)
    if "text" in frame and wanted("table1.md"):  # text: the paper's Table 1, from the score table
        from msif.summaries import table1_markdown, table1_rows

        rows = table1_rows(frame, int(cfg.output.top_k))
        atomic_write_text(table1_markdown(rows, f"Table 1: {title}"), path / "table1.md")
        atomic_write_text(pd.DataFrame(rows).to_csv(index=False), path / "table1.csv")
    if len(tasks.input_shape) == 3 and wanted("influence_grid.png"):
        plots.influence_figure(
            frame,
            tasks.pretrain.train,
            target_set(cfg, tasks),
            cfg.dataset.get("normalize"),
            int(cfg.output.top_k),
            path / "influence_grid.png",
            title,
            f"the summed test loss L_T ({cfg.target.kind})",
        )


def report(cfg: DictConfig, frame: pd.DataFrame, summary: dict, path: Path) -> None:
    for t in influence_tables(frame, summary, int(cfg.output.top_k)):
        console.print(t)
    if "text" in frame:
        from msif.summaries import table1_rows, table1_table

        console.print(table1_table(table1_rows(frame, int(cfg.output.top_k)), int(cfg.output.top_k)))
        if (path / "table1.md").exists():
            say(f"Table 1: {path / 'table1.md'}")
    say(f"scores: {path / 'scores.parquet'} ({len(frame):,} rows)")


def stochastic_layers(net: torch.nn.Module) -> str:
    """The layers whose train-mode output differs from eval mode (batch norm, dropout), named; "" when none."""
    kinds = sorted({type(m).__name__ for m in net.modules() if isinstance(m, BEHAVE_DIFFERENTLY)})
    return ", ".join(kinds)


BEHAVE_DIFFERENTLY = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.dropout._DropoutNd)
