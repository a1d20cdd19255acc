"""The short tables each stage ends with on the console (rich), built from the stage's metrics and summaries."""

from __future__ import annotations

import pandas as pd
from rich.table import Table

from msif.console import table

CLEANSE_LABELS = {"none": "no removal", "harmful": "most harmful removed", "random": "as many removed at random"}


def trained_table(stage: str, metrics: dict) -> Table:
    """Loss and accuracy of a trained network on its train and test splits, and its parameter counts."""
    lm = "perplexity" in metrics["test"]  # a language model: next-token accuracy and the perplexity per token
    rows = [
        [split, metrics[split]["n"], metrics[split]["loss"], f"{100 * metrics[split]['accuracy']:.2f}%"]
        + ([f"{metrics[split]['perplexity']:.1f}"] if lm else [])
        for split in ("train", "test")
    ]
    fit = metrics["fit"]
    params = ", ".join(f"|{k.replace('Theta', 'Θ')}| = {v:,}" for k, v in metrics["parameters"].items())
    how = "imported weights" if "imported" in fit else f"{fit['steps']} steps, {fit['seconds']:.1f} s"
    columns = ["split", "examples", "mean loss", "next-token accuracy" if lm else "accuracy"]
    t = table(f"{stage}: {how}", columns + (["perplexity"] if lm else []), rows)
    origin = f"\nfrom {fit['imported']}" if "imported" in fit else ""
    if metrics.get("unigram_test_perplexity"):
        origin += f"\nunigram baseline: test perplexity {metrics['unigram_test_perplexity']:.1f}"
    if metrics.get("random_embedding"):
        r = metrics["random_embedding"]
        origin += (
            f"\nthe same head on a random, untrained W: test accuracy {100 * r['test_accuracy']:.2f}% "
            f"(majority class {100 * r['majority']:.2f}%)"
        )
    t.caption, t.caption_justify = f"parameters: {params}{origin}", "left"
    return t


def table1_rows(frame: pd.DataFrame, k: int) -> list[dict]:
    """The paper's Table 1 for text: per test sentence (one target T when the scores are summed), the k pretraining
    sentences with the largest |I| and the k with the smallest, with their scores."""
    out = []
    groups = frame.groupby("test_index", sort=False) if "test_index" in frame else [(None, frame)]
    for t, f in groups:
        order = f.assign(magnitude=f["score"].abs()).sort_values("magnitude", ascending=False)
        for which, part in (("largest |I|", order.head(k)), ("smallest |I|", order.tail(k)[::-1])):
            for r in part.itertuples():
                out.append(
                    {
                        "test_index": None if t is None else int(t),
                        "test_text": getattr(r, "test_text", None),
                        "test_label": getattr(r, "test_class_name", None),
                        "which": which,
                        "index": int(r.index),
                        "score": float(r.score),
                        "text": r.text,
                    }
                )
    return out


def table1_markdown(rows: list[dict], title: str) -> str:
    """Table 1 as markdown: a section per test sentence, its largest- and smallest-|I| pretraining sentences."""
    lines = [f"# {title}", ""]
    for t in dict.fromkeys(r["test_index"] for r in rows):
        mine = [r for r in rows if r["test_index"] == t]
        head = mine[0]
        if t is None:
            lines.append("## T = the whole test set (summed)")
        else:
            lines.append(f"## test sentence #{t} ({head['test_label']}): {head['test_text']}")
        lines += ["", "| | pretraining sentence | index | I |", "|---|---|---:|---:|"]
        for r in mine:
            which, text = (str(v).replace("|", "\\|") for v in (r["which"], r["text"]))
            lines.append(f"| {which} | {text} | {r['index']} | {r['score']:.4g} |")
        lines.append("")
    return "\n".join(lines)


def table1_table(rows: list[dict], k: int) -> Table:
    """The first test sentence's part of Table 1, for the console."""
    t = rows[0]["test_index"]
    mine = [r for r in rows if r["test_index"] == t]
    what = "T" if t is None else f"test sentence #{t}: {str(mine[0]['test_text'])[:80]}"
    return table(
        f"Table 1: the pretraining sentences with the largest and smallest |I| ({what})",
        ["", "index", "I", "pretraining sentence"],
        [[r["which"], r["index"], r["score"], str(r["text"])[:90]] for r in mine],
    )


def influence_tables(frame: pd.DataFrame, summary: dict, top_k: int) -> list[Table]:
    """The most harmful and helpful examples (for the first test point when per-test), timings, and the solves."""
    f = frame if "test_index" not in frame else frame[frame["test_index"] == frame["test_index"].iloc[0]]
    f = f.sort_values("score", ascending=False)
    rows = [
        ["harmful", int(r.index), r.class_name, r.score, r.predicted_removal_effect] for r in f.head(top_k).itertuples()
    ]
    rows += [
        ["helpful", int(r.index), r.class_name, r.score, r.predicted_removal_effect]
        for r in f.tail(top_k)[::-1].itertuples()
    ]
    which = "" if "test_index" not in frame else f" for test point {int(f['test_index'].iloc[0])}"
    tables = [
        table(
            f"most harmful and most helpful pretraining examples{which}",
            ["", "index", "class", "score I", "ΔL_T if removed ≈ −I/m"],
            rows,
        )
    ]
    sec = summary.get("seconds", {})
    order = ["gradients", "ihvp1", "mixed_term", "ihvp2", "ihvp", "scoring", "total"]
    steps = [k for k in order if k in sec] or order
    earlier = summary.get("seconds_reused") or {}
    title = "timings (s)" + (
        f" of this run; the solves it reused took {sum(earlier.values()):.1f} s in an earlier run" if earlier else ""
    )
    tables.append(table(title, steps, [[f"{sec.get(s, 0.0):.2f}" for s in steps]]))
    solves = summary.get("solves", [])
    if solves:
        tables.append(
            table(
                "IHVP solves",
                ["Hessian", "method", "system solved", "damping", "iterations", "HVPs", "residual", "‖Hx−b‖/‖b‖"],
                [
                    [
                        r["label"],
                        r["method"],
                        r.get("system", ""),
                        r["damping"],
                        r["iterations"],
                        r["hvps"],
                        f"{r['residual']:.2e}",
                        "-" if r["inverse_residual"] is None else f"{r['inverse_residual']:.2e}",
                    ]
                    for r in merge_solves(solves)
                ],
            )
        )
    return tables


def merge_solves(solves: list[dict]) -> list[dict]:
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


def versus_msif(summary: dict, name: str) -> str:
    """msif's r (or LDS) minus `name`'s on the same retrains, with its paired interval ('' for msif's own row and
    for summaries written before the paired difference)."""
    d = summary.get("msif_minus", {}).get(name)
    if d is None:
        return ""
    ci = d.get("ci95")
    return f"{d['difference']:+.3f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")


def loo_table(summary: dict) -> Table:
    """Pearson r and Spearman ρ of predicted against actual leave-one-out effects, with their intervals, and for
    the compared scores msif's advantage in r on the same retrains (paired interval)."""
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
                f"{s.get('fit_slope', float('nan')):.3g}",
                versus_msif(summary, name),
            ]
        )
    return table(
        f"predicted −I/m vs actual ΔL_T ({summary['dataset']}, case {summary['case']}, "
        f"{summary['retrain_seconds']['mean']:.1f} s per retrain)",
        ["scores", "k", "Pearson r", "95% CI", "Spearman ρ", "95% CI", "slope (predicted / actual)", "msif r − this r"],
        rows,
    )


def cleanse_tables(summary: dict, conditions: tuple[str, ...]) -> list[Table]:
    """Accuracy and loss per condition (mean ± std over seeds) and the paired differences."""
    cond = summary["conditions"]
    rows = [
        [
            CLEANSE_LABELS[c],
            len(cond[c]["seeds"]),
            f"{100 * cond[c]['test_accuracy_mean']:.2f}% ± {100 * cond[c]['test_accuracy_std']:.2f}",
            f"{cond[c]['test_loss_mean']:.4f} ± {cond[c]['test_loss_std']:.4f}",
        ]
        for c in conditions
        if c in cond
    ]

    def p(d: dict) -> str:
        return "" if d.get("p_value") is None else f"{d['p_value']:.3g}"

    paired = [
        [
            name,
            f"{100 * d['test_accuracy']['mean']:+.2f} ± {100 * d['test_accuracy']['std']:.2f} points",
            p(d["test_accuracy"]),
            f"{d['test_loss']['mean']:+.4f} ± {d['test_loss']['std']:.4f}",
            p(d["test_loss"]),
        ]
        for name, d in summary["paired"].items()
    ]
    return [
        table(
            f"cleanse: finetune test set after retraining ({summary['removed']:,} of {summary['m']:,} removed, "
            f"{summary['start']} start)",
            ["condition", "seeds", "accuracy (mean ± std)", "loss (mean ± std)"],
            rows,
        ),
        table(
            "paired differences over the same seeds (p: two-sided paired t-test)",
            ["", "accuracy", "p", "loss", "p"],
            paired,
        ),
    ]


VERDICT_STYLE = {"good": "green", "fair": "yellow", "poor": "red", "unknown": "dim"}


def reliability_table(checks: list, verdict: str) -> Table:
    """The reliability verdict of an influence run (msif.stability.reliability): one row per check."""
    t = table(
        f"reliability: {verdict}",
        ["check", "value", "verdict", "advice"],
        [[c.what, c.value, f"[{VERDICT_STYLE[c.verdict]}]{c.verdict}[/]", c.advice] for c in checks],
    )
    t.caption = (
        "The residual of the system each solver solved decides whether its ranking is converged; ‖Hx − b‖/‖b‖ in "
        "the solve table is how far the damped solve is from an exact inverse, large by design where H is damped."
    )
    t.caption_justify = "left"
    return t


def faults_tables(summary: dict) -> list[Table]:
    """The share of the planted faults found in the top q, and (with cleansing) the finetune accuracy after each
    removal, the known answer (the flipped examples removed) included."""
    found = summary["recovery"]
    baselines = found.get("baselines", [])  # absent in summaries written before the loss baseline
    names = {"pretrain_loss": "by pretrain loss"}
    rows = [
        [
            f"{100 * float(q):g}%",
            f"{100 * found['by_score'][f'{q:g}']:.1f}%",
            f"{100 * found['by_abs_score'][f'{q:g}']:.1f}%",
            *[f"{100 * found[f'by_{b}'][f'{q:g}']:.1f}%" for b in baselines],
            f"{100 * float(q):g}%",  # a random ordering finds a share q in the top q
        ]
        for q in found["inspect"]
    ]
    out = [
        table(
            f"{found['flipped']:,} flipped of {found['m']:,}: found in the top",
            ["inspected", "by score", "by |score|", *[names.get(b, f"by {b}") for b in baselines], "random order"],
            rows,
        )
    ]
    if "cleanse" in summary:
        cond = summary["cleanse"]["conditions"]
        labels = {**CLEANSE_LABELS, "harmful": "top scored removed (as many as flipped)"}
        acc = [
            [
                labels[c],
                len(cond[c]["seeds"]),
                f"{100 * cond[c]['test_accuracy_mean']:.2f}% ± {100 * cond[c]['test_accuracy_std']:.2f}",
            ]
            for c in ("none", "harmful", "random")
            if c in cond
        ]
        o = summary["oracle"]
        acc.append(
            [
                "the flipped removed (known answer)",
                len(o["seeds"]),
                f"{100 * o['test_accuracy_mean']:.2f}% ± {100 * o['test_accuracy_std']:.2f}",
            ]
        )
        out.append(table("finetune test accuracy after retraining both stages", ["removal", "seeds", "accuracy"], acc))
    return out


def lds_table(summary: dict) -> Table:
    """The LDS of msif's scores and of the baselines on the same subset retrains, with intervals."""
    rows = []
    for name, s in summary["lds"].items():
        ci = s.get("lds_ci95")
        rows.append(
            [
                name,
                s["n"],
                f"{s['lds']:+.3f}",
                f"[{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "-",
                f"{s['pearson_r']:+.3f}",
                versus_msif(summary, name),
            ]
        )
    per = summary.get("per_test")
    t = table(
        f"linear datamodeling score ({summary['dataset']}, case {summary['case']}, {summary['subsets']} subsets "
        f"keeping {100 * summary['alpha']:g}%, {summary['retrain_seconds']['mean']:.1f} s per retrain)",
        ["scores", "subsets", "LDS (Spearman ρ)", "95% CI", "Pearson r", "msif LDS − this LDS"],
        rows,
    )
    if per:
        t.caption = (
            f"per test point ({per['points']}): mean LDS {per['mean']:+.3f}, median {per['quantiles']['50%']:+.3f}, "
            f"quartiles [{per['quantiles']['25%']:+.3f}, {per['quantiles']['75%']:+.3f}]"
        )
        t.caption_justify = "left"
    return t
