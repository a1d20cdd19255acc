"""Stage 4, `msif validate-loo`: predicted influence against leave-one-out retraining (paper Figures 2 and 3).

Writes, in `<influence run>/loo-<sig>/`: reference.json (the reference test loss), loo.csv (one row per finished
retrain, appended as each completes, so a rerun resumes), loo_summary.json (written last) and loo.png.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from msif.config import CONF_DIR, RESPONSE_METHODS
from msif.console import console, progress, say
from msif.errors import MsifError
from msif.io import atomic_write_json, atomic_write_text
from msif.lifecycle import Context, ResumableRows, Stage, run, run_jobs, threads_per_worker
from msif.loo import (
    SELECTION_DRAW,
    Retrainer,
    check_selection,
    correlation,
    measured_elsewhere,
    noise,
    plot,
    reference_losses,
    select_examples,
    summarize,
)
from msif.runs import RunFolder
from msif.stages.finetune import finetuned
from msif.stages.influence import INFLUENCE, InfluenceResult, influence, report_reliability, stability
from msif.summaries import loo_table
from msif.targets import predict, require_multi_stage, select_targets

# loo settings that cannot change the results (finetune_start only matters when the embedding is finetuned)
NOT_IN_SIGNATURE = {"fixed": ("workers", "finetune_start"), "updated": ("workers",)}
DRIFT_WARNING = 0.05  # |L_T(reference retrain) / L_T(trained model) - 1| above which validate-loo warns
BASE_COLUMNS = [
    "index",
    "source_index",
    "label",
    "class_name",
    "exposure",
    "score",
    "predicted_effect",
    "actual_effect",
    "seconds",
]


@dataclass
class LooResult:
    path: Path
    table: pd.DataFrame
    summary: dict


@dataclass
class Scored:
    main: InfluenceResult
    compared: InfluenceResult | None


class ValidateLoo(Stage):
    name = "validate-loo"
    marker = None  # always continues its table (finished retrains are skipped)

    def check(self, cfg: DictConfig, ctx: Context) -> None:
        require_multi_stage(cfg, "validate-loo", "retrains both stages")
        if cfg.target.per_test:
            raise MsifError(
                "validate-loo measures one summed target L_T, but target.per_test=true was given.",
                "Drop target.per_test (choose T with target.kind / target.indices instead).",
            )
        if cfg.loo.get("compare"):
            compare_config(cfg, cfg.loo.compare)
        check_selection(cfg.loo, len(ctx.tasks(cfg).pretrain.train))
        INFLUENCE.check(cfg, ctx)

    def upstream(self, cfg: DictConfig, ctx: Context) -> Scored:
        name = cfg.loo.get("compare")
        main = influence(cfg, ctx, verdict=False)
        return Scored(main, influence(compare_config(cfg, name), ctx, verdict=False) if name else None)

    def settings(self, cfg: DictConfig, up: Scored) -> dict[str, Any]:
        return {
            "influence": up.main.path.name,
            "loo": {k: v for k, v in cfg.loo.items() if k not in NOT_IN_SIGNATURE[cfg.case.name]},
            "compare": up.compared.path.name if up.compared else None,
            "draw": SELECTION_DRAW,
        }

    def location(self, cfg: DictConfig, up: Scored, signature: str) -> Path:
        return up.main.path / f"loo-{signature}"

    def compute(self, cfg: DictConfig, ctx: Context, up: Scored, folder: RunFolder) -> LooResult:
        tasks = ctx.tasks(cfg)
        pre_set, m = tasks.pretrain.train, len(tasks.pretrain.train)
        selection = select_examples(up.main.scores, cfg.loo, m)
        compare = cfg.loo.get("compare")
        retrainer = make_retrainer(cfg, ctx)
        seeds = retrainer.seeds()
        repeats = [f"actual_effect_r{i}" for i in range(len(seeds))] if len(seeds) > 1 else []
        columns = BASE_COLUMNS + repeats + ([f"{compare}_score", f"{compare}_predicted_effect"] if compare else [])
        wanted = set(selection)
        table = ResumableRows(
            folder.path / "loo.csv",
            columns,
            key=["index"],
            numeric=["index", "exposure", "score", "predicted_effect", "actual_effect", *repeats],
            valid=lambda f: (
                None
                if set(f["index"]) <= wanted
                else f"holds rows for examples this run did not select ({sorted(set(f['index']) - wanted)[:5]})"
            ),
        )
        todo = [z for z in selection if (z,) not in table]
        steps, examples = retrainer.pretrain_schedule()
        passes = f" ({examples // m} whole pass{'es' if examples // m != 1 else ''})" if examples else ""
        say(
            f"validate-loo ({cfg.case.name}): {len(selection)} examples × {len(seeds)} retrain seeds, K_p={steps} "
            f"pretrain steps{passes} + K_f={cfg.loo.finetune_steps} finetune steps per retrain, z removed by "
            f"{cfg.loo.removal}; {table.done} already done in {table.csv}, {len(todo)} to go"
        )
        references = reference_losses(retrainer, folder.path, seeds, cfg.loo.reference)
        reference = float(sum(references) / len(references))
        counts = sum(retrainer.exposure(seed).double() for seed in seeds) / len(seeds)
        unseen = [z for z in selection if float(counts[z]) == 0.0]
        if unseen:
            say(
                f"[yellow]warning:[/] {len(unseen)} of the {len(selection)} examples are in none of the retrains' "
                f"K_p={steps} pretrain batches, so removing them changes nothing by construction (their measured "
                "effect is 0): the correlation says little. Retrain whole passes (loo.pretrain_epochs=1) so that "
                "every example is seen."
            )
        original = retrainer.original_test_loss()
        drift = (reference - original) / abs(original)
        if abs(drift) > DRIFT_WARNING:
            say(
                f"[yellow]warning:[/] the reference retrain moved L_T from {original:.6g} (the trained model) to "
                f"{reference:.6g} ({100 * drift:+.1f}%): the retrains travel far from the trained weights, where "
                "chaotic training dynamics swamp single-example effects. A smaller loo.lr keeps them near it."
            )
        scores = up.main.scores.set_index("index")["score"]
        other = up.compared.scores.set_index("index")["score"] if up.compared else None

        def row(z: int, effects: list[float], seconds: float) -> dict:
            r = {
                "index": z,
                "source_index": int(pre_set.source_index[z]),
                "label": int(pre_set.labels([z])[0]),
                "class_name": str(pre_set.label_names([z])[0]),
                "exposure": float(counts[z]),
                "score": float(scores[z]),
                "predicted_effect": -float(scores[z]) / m,
                "actual_effect": sum(effects) / len(effects),
                "seconds": seconds,
            }
            if repeats:
                r |= dict(zip(repeats, effects, strict=True))
            if other is not None:
                r[f"{compare}_score"] = float(other[z])
                r[f"{compare}_predicted_effect"] = -float(other[z]) / m
            return r

        elsewhere = measured_elsewhere(cfg, folder.path, references)
        reused = [z for z in todo if z in elsewhere]
        for z in reused:  # the same retrains, measured for another score table of this model: not redone
            e = elsewhere[z]
            table.append(row(z, [e[c] for c in repeats] if repeats else [e["actual_effect"]], 0.0))
        if reused:
            sources = sorted({elsewhere[z]["from"] for z in reused})
            say(
                f"{len(reused)} of the retrains were measured already, with the same retrain settings and reference "
                f"losses, by {len(sources)} other validate-loo run(s) of this model ({', '.join(sources)}): reused "
                "(their seconds count as 0 here)"
            )
        todo = [z for z in todo if z not in elsewhere]

        start = time.perf_counter()
        workers = int(cfg.loo.workers)
        threads = threads_per_worker(cfg.loo.threads, workers)
        with progress() as bar:
            before = len(table.rows)  # finished earlier or reused: not part of this run's rate
            task = bar.add_task("leave-one-out retrains", total=len(selection), completed=before, info="")
            jobs = [(z,) for z in todo]
            for z, losses, seconds in run_jobs(jobs, workers, threads, cfg, make_retrainer, retrain, here=retrainer):
                effects = [loss - ref for loss, ref in zip(losses, references, strict=True)]  # each against its pair
                table.append(row(z, effects, seconds))
                frame = table.frame()
                r = correlation(frame["predicted_effect"].to_numpy(), frame["actual_effect"].to_numpy(), resamples=0)
                rate = (len(table.rows) - before) / max(time.perf_counter() - start, 1e-9) * 60
                bar.update(task, completed=len(table.rows), info=f"r = {r['pearson_r']:+.3f}  {rate:.1f} retrains/min")

        frame = table.frame()
        frame["order"] = frame["index"].map({z: i for i, z in enumerate(selection)})
        frame = frame.sort_values("order").drop(columns="order").reset_index(drop=True)
        atomic_write_text(frame.to_csv(index=False), table.csv)  # final: in selection order, whatever finished first
        summary = summarize(cfg, frame, compare, reference, up.main, up.compared, m)
        summary["pretrain_steps"], summary["pretrain_examples"] = steps, examples
        summary["removal"] = cfg.loo.removal
        summary["exposure"] = {
            "min": float(counts.min()),
            "max": float(counts.max()),
            "mean": float(counts.mean()),
            "equal": bool(counts.min() == counts.max()),
        }
        summary["noise"] = noise(frame, references, summary["correlation"]["msif"]["pearson_r"])
        summary["stability"] = stability(cfg, ctx, up.main)
        summary["original_test_loss"] = original
        summary["reference_drift"] = drift
        summary["retrain_optimizer"] = {
            stage: {"optimizer": retrainer.recipe.train[stage].optimizer, "lr": float(retrainer.recipe.train[stage].lr)}
            for stage in ("pretrain", "finetune")
        }
        plot(cfg, frame, summary, compare, folder.path / "loo.png")
        atomic_write_json(summary, folder.path / "loo_summary.json")
        say(
            f"reference retrain: L_T = {summary['reference_test_loss']:.6g} vs {summary['original_test_loss']:.6g} "
            f"for the trained model ({100 * summary['reference_drift']:+.2f}%)"
        )
        console.print(loo_table(summary))
        say(noise_line(summary["noise"], summary["correlation"]["msif"]["pearson_r"]))
        say(f"saved {table.csv}, {folder.path / 'loo.png'}, {folder.path / 'loo_summary.json'}")
        report_reliability(up.main, summary["stability"])
        return LooResult(folder.path, frame, summary)


VALIDATE_LOO = ValidateLoo()


def validate_loo(cfg: DictConfig, ctx: Context | None = None) -> LooResult:
    """Retrain without each selected example and compare the actual change of L_T with −I(z, T)/m."""
    return run(VALIDATE_LOO, cfg, ctx)


def compare_config(cfg: DictConfig, name: str) -> DictConfig:
    """A copy of `cfg` scoring with something else (loo.compare): `inverse`, the same solvers with the damped inverse
    instead of the retrain response (response.kind=inverse); or the solver group conf/solver/<name>.yaml, with the
    retrain response kept where that solver can apply it (lanczos, exact) and the inverse otherwise (identity: the
    paper's ablation of the inverse)."""
    other = copy.deepcopy(cfg)
    OmegaConf.set_struct(other, False)
    if other.get("check") is not None:
        other.check.stability = False  # only the main scores' stability is reported: no second run of these
    if name == "inverse":
        other.response.kind = "inverse"
        return other
    file = Path(CONF_DIR) / "solver" / f"{name}.yaml"
    if not file.exists():
        options = sorted(["inverse", *(p.stem for p in file.parent.glob("*.yaml"))])
        raise MsifError(f"loo.compare={name} is not a solver.", f"Use one of {options}.")
    other.solver = OmegaConf.load(file)
    if any(other.solver[side].method not in RESPONSE_METHODS for side in ("pretrain", "finetune")):
        other.response.kind = "inverse"
    return other


def make_retrainer(cfg: DictConfig, ctx: Context) -> Retrainer:
    """Retrains from the trained networks, measured on the target T these settings choose."""
    pre, fin = finetuned(cfg, ctx)
    test = ctx.tasks(cfg).finetune.test
    targets = select_targets(cfg.target, test, predict(fin.net, test, ctx.device, cfg.train.eval_batch_size))
    return Retrainer(cfg, ctx.tasks(cfg), pre, fin, ctx.device, targets)


def retrain(retrainer: Retrainer, z: int) -> tuple[int, list[float], float]:
    """(z, L_T without z under each retrain seed, seconds) for one example's leave-one-out retrains."""
    start = time.perf_counter()
    return z, [retrainer.test_loss(z, seed=seed) for seed in retrainer.seeds()], time.perf_counter() - start


def noise_line(found: dict, r: float) -> str:
    """The noise ceiling of r, in words."""
    if found.get("ceiling") is None:
        return f"noise: {found.get('note', 'not measured')}"
    return (
        f"noise: {found['repeats']} retrain seeds; reference L_T spread {found['reference_spread']:.3g}, test–retest "
        f"r of ΔL_T = {found['test_retest_r']:.3f}, so no predictor can exceed r ≈ {found['ceiling']:.3f} against "
        f"their mean; msif's r = {r:.3f}"
        + (f" ({found['r_over_ceiling']:.2f} of it)" if found["r_over_ceiling"] else "")
    )


__all__ = ["LooResult", "compare_config", "validate_loo"]
