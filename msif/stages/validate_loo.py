"""Stage 4, `msif validate-loo`: predicted influence against leave-one-out retraining (paper Figures 2 and 3).

Writes, in `<influence run>/loo-<sig>/`: reference.json (the reference test loss), loo.csv (one row per finished
retrain, appended as each completes, so a rerun resumes), loo_summary.json (written last) and loo.png.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from msif.cli import CONF_DIR
from msif.config import signature, to_plain
from msif.console import console, progress, say, table
from msif.data import Tasks
from msif.errors import MsifError
from msif.io import KEEP, append_csv_row, atomic_write_json, atomic_write_text, read_resumable_csv
from msif.loo import Retrainer, correlation, select_examples
from msif.stages.common import Setup, read_json, run_jobs, setup, threads_per_worker
from msif.stages.finetune import ensure_finetuned
from msif.stages.influence import influence, predict, require_multi_stage, select_targets

# loo settings that cannot change the results (finetune_start only matters when the embedding is finetuned)
NOT_IN_SIGNATURE = {"fixed": ("workers", "finetune_start"), "updated": ("workers",)}
DRIFT_WARNING = 0.05  # |L_T(reference retrain) / L_T(trained model) - 1| above which validate-loo warns
BASE_COLUMNS = ["index", "source_index", "label", "class_name", "score", "predicted_effect", "actual_effect", "seconds"]


@dataclass
class LooResult:
    path: Path
    table: pd.DataFrame
    summary: dict


def validate_loo(cfg: DictConfig, tasks: Tasks | None = None) -> LooResult:
    """Retrain without each selected example and compare the actual change of L_T with −I(z, T)/m."""
    require_multi_stage(cfg, "validate-loo", "retrains both stages")
    if cfg.target.per_test:
        raise MsifError(
            "validate-loo measures one summed target L_T, but target.per_test=true was given.",
            "Drop target.per_test (choose T with target.kind / target.indices instead).",
        )
    env = setup(cfg, tasks)
    pre, fin = ensure_finetuned(cfg, env.tasks)
    main = influence(cfg, env.tasks)
    compare_name = cfg.loo.get("compare")
    compared = influence(with_solver(cfg, compare_name), env.tasks) if compare_name else None
    m = len(env.tasks.pretrain.train)
    selection = select_examples(main.scores, cfg.loo, m)

    settings = {
        "influence": main.path.name,
        "loo": {k: v for k, v in cfg.loo.items() if k not in NOT_IN_SIGNATURE[cfg.case.name]},
        "compare": compared.path.name if compared else None,
    }
    path = main.path / f"loo-{signature(settings)}"
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(OmegaConf.to_yaml(cfg, resolve=True), path / "config.yaml")
    columns = BASE_COLUMNS + ([f"{compare_name}_score", f"{compare_name}_predicted_effect"] if compared else [])
    csv = path / "loo.csv"
    done = read_finished(csv, columns, selection)
    todo = [z for z in selection if z not in set(done["index"])]
    say(
        f"validate-loo ({cfg.case.name}): {len(selection)} examples, K_p={cfg.loo.pretrain_steps} pretrain + "
        f"K_f={cfg.loo.finetune_steps} finetune steps per retrain; {len(done)} already done in {csv}, "
        f"{len(todo)} to go"
    )

    pred = predict(fin, env.tasks.finetune.test, env.device, cfg.train.eval_batch_size)
    targets = select_targets(cfg.target, env.tasks.finetune.test, pred)
    retrainer = Retrainer(cfg, env.tasks, pre, fin, env.device, targets)
    reference = _reference(cfg, retrainer, path)
    original = retrainer.original_test_loss()
    drift = (reference - original) / abs(original)
    if abs(drift) > DRIFT_WARNING:
        say(
            f"[yellow]warning:[/] the reference retrain moved L_T from {original:.6g} (the trained model) to "
            f"{reference:.6g} ({100 * drift:+.1f}%): the retrains travel far from the trained weights, where "
            "chaotic training dynamics swamp single-example effects. A smaller loo.lr keeps them near it."
        )
    scores = main.scores.set_index("index")["score"]
    other = compared.scores.set_index("index")["score"] if compared else None
    pre_set = env.tasks.pretrain.train

    def row(z: int, loss: float, seconds: float) -> dict:
        r = {
            "index": z,
            "source_index": int(pre_set.source_index[z]),
            "label": int(pre_set.y[z]),
            "class_name": pre_set.class_names[int(pre_set.y[z])],
            "score": float(scores[z]),
            "predicted_effect": -float(scores[z]) / m,
            "actual_effect": loss - reference,
            "seconds": seconds,
        }
        if other is not None:
            r[f"{compare_name}_score"] = float(other[z])
            r[f"{compare_name}_predicted_effect"] = -float(other[z]) / m
        return r

    if not csv.exists():
        atomic_write_text(",".join(columns) + "\n", csv)
    rows = done.to_dict("records")
    start = time.perf_counter()
    with progress() as bar:
        task = bar.add_task("leave-one-out retrains", total=len(selection), completed=len(done), info="")
        for z, loss, seconds in _run(cfg, retrainer, todo):
            rows.append(row(z, loss, seconds))
            append_csv_row(csv, columns, rows[-1])
            frame = pd.DataFrame(rows)
            r = correlation(frame["predicted_effect"].to_numpy(), frame["actual_effect"].to_numpy(), resamples=0)
            rate = (len(rows) - len(done)) / max(time.perf_counter() - start, 1e-9) * 60
            bar.update(task, completed=len(rows), info=f"r = {r['pearson_r']:+.3f}  {rate:.1f} retrains/min")

    frame = pd.DataFrame(rows, columns=columns)
    frame["order"] = frame["index"].map({z: i for i, z in enumerate(selection)})
    frame = frame.sort_values("order").drop(columns="order").reset_index(drop=True)
    atomic_write_text(frame.to_csv(index=False), csv)  # final: in selection order, whatever the completion order
    summary = _summarize(cfg, frame, compare_name, reference, main, compared, m)
    summary["original_test_loss"] = original
    summary["reference_drift"] = drift
    summary["retrain_optimizer"] = {
        stage: {"optimizer": retrainer.recipe.train[stage].optimizer, "lr": float(retrainer.recipe.train[stage].lr)}
        for stage in ("pretrain", "finetune")
    }
    _plot(cfg, frame, summary, compare_name, path / "loo.png")
    atomic_write_json(summary, path / "loo_summary.json")
    _report(summary, path)
    return LooResult(path, frame, summary)


def with_solver(cfg: DictConfig, name: str) -> DictConfig:
    """A copy of `cfg` with the `solver` group replaced by conf/solver/<name>.yaml."""
    file = Path(CONF_DIR) / "solver" / f"{name}.yaml"
    if not file.exists():
        options = sorted(p.stem for p in file.parent.glob("*.yaml"))
        raise MsifError(f"loo.compare={name} is not a solver.", f"Use one of {options}.")
    other = copy.deepcopy(cfg)
    OmegaConf.set_struct(other, False)
    other.solver = OmegaConf.load(file)
    return other


def read_finished(csv: Path, columns: list[str], selection: list[int]) -> pd.DataFrame:
    """The retrains already in loo.csv; refuses (and keeps) a file that is not a complete table of this run."""
    if not csv.exists():
        return pd.DataFrame(columns=columns)
    frame = read_resumable_csv(csv, columns)
    numeric = frame[["index", "score", "predicted_effect", "actual_effect"]]
    if numeric.isna().any().any() or not all(pd.api.types.is_numeric_dtype(t) for t in numeric.dtypes):
        raise MsifError(f"{csv} has empty or non-numeric values in its rows.", KEEP)
    unknown = sorted(set(frame["index"]) - set(selection))
    if unknown or frame["index"].duplicated().any():
        raise MsifError(f"{csv} holds rows for examples this run did not select ({unknown[:5]}) or repeats one.", KEEP)
    return frame


def _reference(cfg: DictConfig, retrainer: Retrainer, path: Path) -> float:
    """L_T of the reference: the retrain with z (cached in reference.json), or the original finetuned model."""
    file = path / "reference.json"
    cached = read_json(file)
    if cached.get("reference") == cfg.loo.reference and "test_loss" in cached:
        return float(cached["test_loss"])
    start = time.perf_counter()
    if cfg.loo.reference == "retrain":
        loss = retrainer.test_loss(None)
    elif cfg.loo.reference == "original":
        loss = retrainer.original_test_loss()
    else:
        raise MsifError(f"Unknown loo.reference '{cfg.loo.reference}'.", "Use retrain or original.")
    atomic_write_json({"reference": cfg.loo.reference, "test_loss": loss, "seconds": time.perf_counter() - start}, file)
    return loss


def _run(cfg: DictConfig, retrainer: Retrainer, todo: list[int]):
    """Yield (z, L_T without z, seconds) as retrains finish, in this process or in `loo.workers` processes."""
    threads = threads_per_worker(cfg.loo.threads, int(cfg.loo.workers))

    def here(z: int) -> tuple[int, float, float]:
        start = time.perf_counter()
        return z, retrainer.test_loss(z), time.perf_counter() - start

    yield from run_jobs(
        [(z,) for z in todo], int(cfg.loo.workers), threads, here, cfg, _init_worker, _retrain_in_worker
    )


_WORKER: Retrainer | None = None


def _init_worker(cfg: DictConfig, env: Setup) -> None:
    global _WORKER
    pre, fin = ensure_finetuned(cfg, env.tasks)
    targets = select_targets(
        cfg.target,
        env.tasks.finetune.test,
        predict(fin, env.tasks.finetune.test, env.device, cfg.train.eval_batch_size),
    )
    _WORKER = Retrainer(cfg, env.tasks, pre, fin, env.device, targets)


def _retrain_in_worker(z: int) -> tuple[int, float, float]:
    start = time.perf_counter()
    return z, _WORKER.test_loss(z), time.perf_counter() - start


def _summarize(cfg, frame, compare_name, reference, main, compared, m) -> dict:
    actual = frame["actual_effect"].to_numpy()
    seed, n_boot = int(cfg.loo.seed), int(cfg.loo.bootstrap)
    stats = {"msif": correlation(frame["predicted_effect"].to_numpy(), actual, seed, n_boot)}
    if compare_name:
        stats[compare_name] = correlation(frame[f"{compare_name}_predicted_effect"].to_numpy(), actual, seed, n_boot)
    return {
        "stage": "validate-loo",
        "dataset": cfg.dataset.name,
        "case": cfg.case.name,
        "k": len(frame),
        "m": m,
        "pretrain_steps": int(cfg.loo.pretrain_steps),
        "finetune_steps": int(cfg.loo.finetune_steps),
        "reference": cfg.loo.reference,
        "reference_test_loss": reference,
        "selection": cfg.loo.selection if cfg.loo.indices is None else "indices",
        "solver": to_plain(cfg.solver),
        "correlation": stats,
        "retrain_seconds": {"mean": float(frame["seconds"].mean()), "total": float(frame["seconds"].sum())},
        "influence_run": str(main.path),
        "compare_run": str(compared.path) if compared else None,
        "influence_seconds": main.summary.get("seconds", {}).get("total"),
    }


def _plot(cfg, frame, summary, compare_name, path: Path) -> None:
    from msif import plots

    panels = [
        (f"msif ({cfg.solver.pretrain.method})", frame["predicted_effect"].to_numpy(), summary["correlation"]["msif"])
    ]
    if compare_name:
        panels.append(
            (
                f"{compare_name} (ablation)",
                frame[f"{compare_name}_predicted_effect"].to_numpy(),
                summary["correlation"][compare_name],
            )
        )
    plots.loo_scatter(
        panels,
        frame["actual_effect"].to_numpy(),
        path,
        f"{cfg.dataset.name}, case {cfg.case.name}: leave-one-out retraining, k = {len(frame)}",
    )


def _report(summary: dict, path: Path) -> None:
    rows = []
    for name, s in summary["correlation"].items():
        ci_r, ci_rho = s.get("pearson_r_ci95"), s.get("spearman_rho_ci95")
        rows.append(
            [
                name,
                s["n"],
                f"{s['pearson_r']:+.3f}",
                f"[{ci_r[0]:+.2f}, {ci_r[1]:+.2f}]" if ci_r else "-",
                f"{s['spearman_rho']:+.3f}",
                f"[{ci_rho[0]:+.2f}, {ci_rho[1]:+.2f}]" if ci_rho else "-",
            ]
        )
    say(
        f"reference retrain: L_T = {summary['reference_test_loss']:.6g} vs {summary['original_test_loss']:.6g} for "
        f"the trained model ({100 * summary['reference_drift']:+.2f}%)"
    )
    console.print(
        table(
            f"predicted −I/m vs actual ΔL_T ({summary['dataset']}, case {summary['case']}, "
            f"{summary['retrain_seconds']['mean']:.1f} s per retrain)",
            ["scores", "k", "Pearson r", "95% CI", "Spearman ρ", "95% CI"],
            rows,
        )
    )
    say(f"saved {path / 'loo.csv'}, {path / 'loo.png'}, {path / 'loo_summary.json'}")


__all__ = ["LooResult", "read_finished", "validate_loo", "with_solver"]
