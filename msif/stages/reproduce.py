"""`msif reproduce`: run every experiment of the paper that can run here and write <report_dir>/REPORT.md.

A plan (conf/plan/<name>.yaml) lists the experiments: each names its kind (loo, identity, per_test, histograms,
cleanse), the stage overrides of its runs and the paper's number. Each run is the ordinary stage (validate-loo,
influence, cleanse) with those overrides, so finished run folders are reused and a rerun only does what is missing.
The report sets each figure beside the paper's number, msif's number, the settings and the compute time.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from msif.config import to_plain, validate_config
from msif.console import console, say, table
from msif.errors import MsifError
from msif.report import Entry, seconds, write_report
from msif.runs import read_json

KINDS = ("loo", "identity", "per_test", "histograms", "cleanse", "lds", "faults", "table1")


@dataclass
class Context:
    """What every experiment handler gets: the plan, the overrides common to every run, and the report folder."""

    cfg: DictConfig
    common: list[str]
    figures: Path
    runs: dict[str, float] = field(default_factory=dict)  # run folder -> recorded compute seconds (each counted once)
    run_context: Any = None  # msif.lifecycle.Context shared by every experiment's stages

    def compose(self, stage: str, overrides: list[str]) -> DictConfig:
        return compose_stage(stage, [*self.common, *overrides])

    def count(self, path, seconds) -> float:
        if seconds is not None:
            self.runs[str(path)] = float(seconds)
        return float(seconds or 0.0)

    def count_upstream(self, cfg: DictConfig):
        """Record the pretrain and finetune runs `cfg` names (made when missing): (their compute seconds, the run
        context every experiment shares, so each data set is loaded once for the whole plan)."""
        from msif.lifecycle import Context as RunContext
        from msif.stages.finetune import finetuned

        if self.run_context is None:
            self.run_context = RunContext(cfg)
        pre, fin = finetuned(cfg, self.run_context)
        seconds = self.count(pre.run.path, pre.metrics.get("seconds")) + self.count(
            fin.run.path, fin.metrics.get("seconds")
        )
        return seconds, self.run_context


def compose_stage(stage: str, overrides: list[str]) -> DictConfig:
    """The config `msif <stage> <overrides>` would run with (inside a running Hydra app or from plain Python)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from msif.config import CONF_DIR

    name = stage.replace("-", "_")
    try:
        if GlobalHydra.instance().is_initialized():
            return compose(config_name=name, overrides=overrides)
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name=name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        first = " ".join(str(err).split())[:300]
        raise MsifError(
            f"The plan's overrides for `msif {stage}` do not compose ({first}); overrides: {overrides}.",
            f"Fix the experiment's overrides in the plan file (conf/plan/), or check them with "
            f"`msif {stage} <overrides> --cfg job`.",
        ) from None


def reproduce(cfg: DictConfig) -> Path:
    """Run the plan's experiments in order and write the report; returns the report's path."""
    validate_config(cfg)
    plan = cfg.plan
    experiments = list(plan.experiments)
    only = to_plain(cfg.only)
    if only:
        unknown = sorted(set(only) - {e.id for e in experiments})
        if unknown:
            raise MsifError(
                f"only= names experiments that plan '{plan.name}' does not have: {unknown}.",
                f"Its experiments are {[e.id for e in experiments]}.",
            )
        experiments = [e for e in experiments if e.id in only]
    for e in experiments:
        if e.kind not in KINDS:
            raise MsifError(f"Experiment {e.id} of plan '{plan.name}' has unknown kind '{e.kind}'.", f"Use {KINDS}.")
    report_dir = Path(cfg.report_dir)
    figures = report_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    common = [f"profile={plan.profile}", *[str(o) for o in plan.common]]
    for key in ("output_root", "data_root", "cache_dir", "device", "dtype"):
        if cfg.get(key) is not None:
            common.append(f"{key}={_quote(cfg[key])}")
    ctx = Context(cfg, common, figures)
    entries: list[Entry] = []
    started = time.perf_counter()
    for i, e in enumerate(experiments, 1):
        say(f"[bold]reproduce {i}/{len(experiments)}: {e.id}, {e.title}[/]")
        t0 = time.perf_counter()
        entry = HANDLERS[e.kind](ctx, e)
        entry.wall = time.perf_counter() - t0
        entries.append(entry)
        console.print(table(f"{e.id}: {e.title}", ["", "paper", "msif"], [["", entry.paper, entry.measured]]))
    path = write_report(report_dir, plan, entries, sum(ctx.runs.values()), time.perf_counter() - started)
    console.print(
        table(
            f"reproduce ({plan.name}): {len(entries)} experiments",
            ["experiment", "paper", "msif", "compute (s)", "this run (s)"],
            [[x.id, x.paper, x.measured, seconds(x.compute), seconds(x.wall)] for x in entries],
        )
    )
    say(f"report: {path}")
    return path


def _quote(value) -> str:
    text = str(value)
    return text if text.replace("/", "").replace("_", "").replace("-", "").replace(".", "").isalnum() else repr(text)


def _settings(cfg: DictConfig, *keys: str) -> str:
    """A short `key=value` description of the settings that matter for a figure."""
    parts = [f"{cfg.dataset.name}, case {cfg.case.name}"]
    values = {
        "solver": lambda: (
            f"{cfg.solver.pretrain.method} "
            + (
                f"ρ={cfg.solver.pretrain.relative_damping:g}/{cfg.solver.finetune.relative_damping:g}·|λ|max"
                if cfg.solver.pretrain.get("relative_damping") is not None
                else f"λ={cfg.solver.pretrain.damping:g}/{cfg.solver.finetune.damping:g}"
            )
            + f" ({cfg.solver.pretrain.get('iterations', '-')} it)"
        ),
        "hessian": lambda: f"H_G on {cfg.hessian.pretrain_sample} examples",
        "steps": lambda: f"{cfg.train.pretrain.steps}/{cfg.train.finetune.steps} train steps",
        "loo": lambda: (
            f"k={cfg.loo.k}, K_p={cfg.loo.pretrain_steps or f'{cfg.loo.pretrain_epochs} epochs'}, "
            f"K_f={cfg.loo.finetune_steps}, {cfg.loo.repeats} seeds, "
            f"{cfg.loo.optimizer or cfg.train.pretrain.optimizer} lr {cfg.loo.lr}"
        ),
        "n": lambda: f"n={cfg.dataset.finetune.n_train or 'all'}",
    }
    parts += [values[k]() for k in keys]
    return "; ".join(parts)


def _loo(ctx: Context, e: DictConfig) -> Entry:
    from msif import plots
    from msif.stages import validate_loo

    cfg = ctx.compose("validate-loo", list(e.overrides))
    compute, run_context = ctx.count_upstream(cfg)
    result = validate_loo(cfg, run_context)
    s = result.summary
    compute += ctx.count(s["influence_run"], s.get("influence_seconds"))
    ref = read_json(result.path / "reference.json").get("seconds", 0.0)
    compute += ctx.count(result.path, s["retrain_seconds"]["total"] + ref)
    which = str(e.get("scores", "msif"))
    column = "predicted_effect" if which == "msif" else f"{which}_predicted_effect"
    stats = s["correlation"][which]
    label = "msif" if which == "msif" else f"{which} (all inverse Hessians replaced by I)"
    figure = ctx.figures / f"{e.id}.png"
    plots.loo_scatter(
        [(label, result.table[column].to_numpy(), stats)],
        result.table["actual_effect"].to_numpy(),
        figure,
        f"{e.title}: k = {s['k']}",
    )
    ci = stats.get("pearson_r_ci95") or [float("nan")] * 2
    ceiling = (s.get("noise") or {}).get("ceiling")
    stable = s.get("stability") or {}
    cells = {}
    if which == "msif":
        cells["loo"] = f"{_interval(stats['pearson_r'], ci)} (k = {s['k']})"
        if ceiling:
            cells["ceiling"] = f"{ceiling:.3f}"
        if "pearson_r" in stable:
            cells["stability"] = f"{stable['pearson_r']:.3f} ({stable['top_overlap_abs']})"
    if "identity" in s["correlation"]:  # scored on the same retrains (loo.compare=identity)
        versus = (s.get("msif_minus") or {}).get("identity")
        cells["identity"] = f"{s['correlation']['identity']['pearson_r']:.2f}" + (
            f"; {_interval(versus['difference'], versus['ci95'], signed=True)}" if versus else ""
        )
    return Entry(
        e.id,
        e.title,
        str(e.paper),
        f"r = {stats['pearson_r']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}], ρ = {stats['spearman_rho']:.2f}"
        + (f"; noise ceiling {ceiling:.2f}" if ceiling else "")
        + (f"; stability r {stable['pearson_r']:.3f}" if "pearson_r" in stable else ""),
        _settings(cfg, "loo", "solver") + f"; reference drift {100 * s.get('reference_drift', 0.0):+.1f}%",
        compute,
        [figure.name],
        [str(result.path)],
        str(e.get("note", "")),
        validation={_row(cfg): cells},
    )


def _row(cfg: DictConfig) -> str:
    """The validation table's row label: the data set (with its size when the plan reduced it) and the case."""
    name = {"mnist": "MNIST", "cifar": "CIFAR-10", "digits": "8×8 digits"}.get(cfg.dataset.name, cfg.dataset.name)
    n = cfg.dataset.pretrain.get("n_train")
    reduced = f" ({int(n):,} pretraining examples, {cfg.train.pretrain.steps} steps)" if n else ""
    return f"{name}{reduced}, {cfg.case.name}"


def _interval(value: float, ci, signed: bool = False) -> str:
    ci = ci or [float("nan")] * 2
    f = "{:+.2f}" if signed else "{:.2f}"
    return f"{f.format(value)} [{f.format(ci[0])}, {f.format(ci[1])}]"


def _per_test(ctx: Context, e: DictConfig) -> Entry:
    from msif.stages import influence

    figures, measured, compute, runs, settings = [], [], 0.0, [], []
    for j, overrides in enumerate(e.runs):
        cfg = ctx.compose("influence", list(overrides))
        upstream, run_context = ctx.count_upstream(cfg)
        result = influence(cfg, run_context, verdict=False)
        compute += upstream + ctx.count(result.path, result.summary["seconds"]["total"])
        grid = result.path / "influence_grid.png"
        if grid.exists():
            name = f"{e.id}_{j}_{cfg.dataset.name}.png"
            shutil.copyfile(grid, ctx.figures / name)
            figures.append(name)
        f = result.scores
        for t, rows in f.groupby("test_index", sort=False):
            top = rows.sort_values("score", ascending=False).iloc[0]
            measured.append(
                f"{cfg.dataset.name} test #{t} (true {top.test_class_name}, predicted {top.test_prediction}) ← "
                f"pretrain #{int(top['index'])} ({top.class_name}, I = {top.score:.3g})"
            )
            break  # one pair per data set, as in the paper
        settings.append(_settings(cfg, "solver") + f"; {len(f['test_index'].unique())} misclassified test points")
        runs.append(str(result.path))
    return Entry(e.id, e.title, str(e.paper), "; ".join(measured), " | ".join(settings), compute, figures, runs)


def _histograms(ctx: Context, e: DictConfig) -> Entry:
    from msif import plots
    from msif.stages import influence

    series, sizes, compute, runs, settings = {}, {}, 0.0, [], []
    for label, overrides in e.runs.items():
        cfg = ctx.compose("influence", list(overrides))
        upstream, run_context = ctx.count_upstream(cfg)
        result = influence(cfg, run_context, verdict=False)
        compute += upstream + ctx.count(result.path, result.summary["seconds"]["total"])
        series[str(label)] = result.scores["score"].to_numpy()
        sizes[str(label)] = int(result.summary["target"]["size"])
        acc = result.summary.get("finetune_test_accuracy")
        settings.append(
            f"{label}: " + _settings(cfg, "n", "steps") + (f", finetune test acc {100 * acc:.1f}%" if acc else "")
        )
        runs.append(str(result.path))
    figure = ctx.figures / f"{e.id}.png"
    plots.score_histogram(series, figure, e.title)
    means = {k: float(np.mean(np.abs(v))) for k, v in series.items()}
    (a, ma), (b, mb) = list(means.items())[:2]
    pa, pb = ma / sizes[a], mb / sizes[b]  # L_T sums over the test set: per test point when the sets differ in size
    measured = f"mean |I|: {ma:.3g} vs {mb:.3g} (ratio {ma / mb:.2f})"
    if sizes[a] != sizes[b]:
        measured += f"; per test point ({sizes[a]:,} vs {sizes[b]:,}): {pa:.3g} vs {pb:.3g} (ratio {pa / pb:.2f})"
    return Entry(e.id, e.title, str(e.paper), measured, " | ".join(settings), compute, [figure.name], runs)


def _cleanse(ctx: Context, e: DictConfig) -> Entry:
    from msif.stages import cleanse

    cfg = ctx.compose("cleanse", list(e.overrides))
    compute, run_context = ctx.count_upstream(cfg)
    result = cleanse(cfg, run_context)
    s = result.summary
    # the cleansing folder lives in its influence run's folder; the summary's path is relative to where it ran
    influence_run = result.path.parent
    influence_seconds = read_json(influence_run / "summary.json")["seconds"]["total"]
    compute += ctx.count(influence_run, influence_seconds)
    own = result.table[~((result.table["condition"] == "none") & (result.table["seed"] == cfg.seed))]
    compute += ctx.count(result.path, float(own["seconds"].sum()))
    figures = []
    for name in ("cleanse.png", "removed_grid.png"):
        if (result.path / name).exists():
            shutil.copyfile(result.path / name, ctx.figures / f"{e.id}_{name}")
            figures.append(f"{e.id}_{name}")
    c = s["conditions"]
    acc = {k: f"{100 * v['test_accuracy_mean']:.2f}% ± {100 * v['test_accuracy_std']:.2f}" for k, v in c.items()}
    d = s["paired"]["harmful - none"]["test_accuracy"]
    measured = (
        f"no removal {acc['none']}, harmful removed {acc['harmful']}, random removed {acc['random']} "
        f"(paired harmful − none {100 * d['mean']:+.2f} ± {100 * d['std']:.2f} points"
        + (f", paired t-test p = {d['p_value']:.2g} over {d['n']} seeds)" if d.get("p_value") is not None else ")")
    )
    settings = _settings(cfg, "solver", "steps") + (
        f"; removed {s['removed']:,} of {s['m']:,} ({100 * s['fraction']:.0f}%), {s['start']} start, seeds {s['seeds']}"
    )
    return Entry(e.id, e.title, str(e.paper), measured, settings, compute, figures, [str(result.path)])


def _lds(ctx: Context, e: DictConfig) -> Entry:
    from msif.stages import validate_lds

    cfg = ctx.compose("validate-lds", list(e.overrides))
    compute, run_context = ctx.count_upstream(cfg)
    result = validate_lds(cfg, run_context)
    s = result.summary
    compute += ctx.count(result.path, s["retrain_seconds"]["total"])
    figure = f"{e.id}_lds.png"
    shutil.copyfile(result.path / "lds.png", ctx.figures / figure)

    def one(name: str) -> str:
        x = s["lds"][name]
        ci = x.get("lds_ci95") or [float("nan")] * 2
        return f"{name} {x['lds']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"

    measured = "LDS: " + ", ".join(one(n) for n in s["lds"])
    settings = _settings(cfg, "solver") + f"; {s['subsets']} subsets keeping {100 * s['alpha']:g}%"
    msif = s["lds"]["msif"]
    cells = {"lds": f"{_interval(msif['lds'], msif.get('lds_ci95'))} ({s['subsets']} subsets)"}
    versus = s.get("msif_minus") or {}
    baselines = [
        f"{s['lds'][b]['lds']:.2f}"
        + (f" (msif − it {_interval(versus[b]['difference'], versus[b]['ci95'], signed=True)})" if b in versus else "")
        for b in ("identity", "single_stage")
        if b in s["lds"]
    ]
    if baselines:
        cells["lds_baselines"] = "; ".join(baselines)
    return Entry(
        e.id,
        e.title,
        str(e.paper),
        measured,
        settings,
        compute,
        [figure],
        [str(result.path)],
        validation={_row(cfg): cells},
    )


def _faults(ctx: Context, e: DictConfig) -> Entry:
    from msif.stages import planted_faults

    cfg = ctx.compose("planted-faults", list(e.overrides))
    if ctx.run_context is None:
        from msif.lifecycle import Context as RunContext

        ctx.run_context = RunContext(cfg)
    result = planted_faults(cfg, ctx.run_context)
    s = result.summary
    compute = 0.0
    # the faults folder lives in its influence run's folder; the summary's path is relative to where it ran
    influence_run = result.path.parent
    for folder in (influence_run.parent.parent, influence_run.parent):  # the damaged pretrain and finetune runs
        compute += ctx.count(folder, read_json(folder / "metrics.json").get("seconds"))
    compute += ctx.count(influence_run, read_json(influence_run / "summary.json")["seconds"]["total"])
    if "cleanse" in s:
        import pandas as pd

        cleansed = influence_run / Path(s["cleanse"]["run"]).name
        compute += ctx.count(cleansed, float(pd.read_csv(cleansed / "cleanse.csv")["seconds"].sum()))
        compute += ctx.count(result.path, float(pd.read_csv(result.path / "oracle.csv")["seconds"].sum()))
    figure = f"{e.id}_faults.png"
    shutil.copyfile(result.path / "faults.png", ctx.figures / figure)
    found = s["recovery"]
    measured = ", ".join(f"{100 * found['by_score'][f'{q:g}']:.0f}% in the top {100 * q:g}%" for q in found["inspect"])
    measured = f"{found['flipped']:,} flipped: " + measured
    top = found["inspect"][len(found["inspect"]) // 2]
    measured += f" (by |score| {100 * found['by_abs_score'][f'{top:g}']:.0f}% in the top {100 * top:g}%" + (
        f", by the pretrain-loss baseline {100 * found['by_pretrain_loss'][f'{top:g}']:.0f}%)"
        if "by_pretrain_loss" in found
        else ")"
    )
    if "cleanse" in s:
        c, o = s["cleanse"]["conditions"], s["oracle"]
        measured += (
            f"; finetune accuracy: no removal {100 * c['none']['test_accuracy_mean']:.2f}%, top scored removed "
            f"{100 * c['harmful']['test_accuracy_mean']:.2f}%, random {100 * c['random']['test_accuracy_mean']:.2f}%,"
            f" the flipped removed {100 * o['test_accuracy_mean']:.2f}%"
        )
    settings = _settings(cfg, "solver") + f"; {100 * s['fraction']:g}% of the labels flipped (seed {s['seed']})"
    cells = {}
    if "0.1" in found["by_abs_score"]:
        loss = found.get("by_pretrain_loss", {}).get("0.1")
        cells["faults"] = f"{100 * found['by_abs_score']['0.1']:.1f}%" + (
            f"; {100 * loss:.1f}%" if loss is not None else ""
        )
    return Entry(
        e.id,
        e.title,
        str(e.paper),
        measured,
        settings,
        compute,
        [figure],
        [str(result.path)],
        validation={_row(cfg): cells},
    )


def _table1(ctx: Context, e: DictConfig) -> Entry:
    """Section 4.5: a language model's pretraining sentences with the largest and smallest |I| for test sentences."""
    from msif.stages import influence
    from msif.summaries import table1_markdown, table1_rows

    cfg = ctx.compose("influence", list(e.overrides))
    upstream, run_context = ctx.count_upstream(cfg)
    result = influence(cfg, run_context, verdict=False)
    s = result.summary
    compute = upstream + ctx.count(result.path, s["seconds"]["total"])
    pre = read_json(Path(s["pretrain_run"]) / "metrics.json")
    fin = read_json(Path(s["finetune_run"]) / "metrics.json")
    k = int(e.get("rows", 3))
    rows = table1_rows(result.scores, k)
    first = [r for r in rows if r["test_index"] == rows[0]["test_index"]]

    def quote(r: dict) -> str:
        return f"“{str(r['text'])[:70]}” (I = {r['score']:.3g})"

    big = [r for r in first if r["which"] == "largest |I|"][0]
    small = [r for r in first if r["which"] == "smallest |I|"][0]
    random_w = fin.get("random_embedding") or {}
    per_sentence = 1000 * s["seconds"].get("scoring", 0) / max(1, s["scored"])
    measured = (
        f"language model test perplexity {pre['test']['perplexity']:.0f} "
        f"(unigram {pre['unigram_test_perplexity']:.0f}); finetune test accuracy {100 * fin['test']['accuracy']:.1f}% "
        f"(random W {100 * random_w.get('test_accuracy', 0):.1f}%, majority {100 * random_w.get('majority', 0):.1f}%);"
        f" test sentence #{first[0]['test_index']}: largest |I| {quote(big)}, smallest {quote(small)}; "
        f"{per_sentence:.2f} ms of scoring per pretraining sentence"
    )
    note = table1_markdown(rows, "Table 1").replace("\n## ", "\n### ").split("\n", 1)[1]
    settings = _settings(cfg, "solver") + f"; {s['scored']:,} of {s['m']:,} pretraining sentences scored"
    return Entry(e.id, e.title, str(e.paper), measured, settings, compute, [], [str(result.path)], note)


HANDLERS: dict[str, Callable[[Context, DictConfig], Entry]] = {
    "loo": _loo,
    "identity": _loo,  # the same validate-loo run, scored with loo.compare=identity (Figure 3)
    "per_test": _per_test,
    "histograms": _histograms,
    "cleanse": _cleanse,
    "lds": _lds,
    "faults": _faults,
    "table1": _table1,
}

__all__ = ["compose_stage", "reproduce"]
