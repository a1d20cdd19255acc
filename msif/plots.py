"""Pictures of influence: the most harmful and most helpful pretraining images (paper Figure 4) and the score
distribution on a log density scale (Figures 5–6)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from msif.io import atomic_write_bytes  # noqa: E402


def _save(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(buf.getvalue(), path)


def score_histogram(series: dict[str, np.ndarray], path: Path, title: str, bins: int = 80) -> None:
    """Density histogram of each score series, log-scaled density axis, on shared bins."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    values = np.concatenate([v for v in series.values() if len(v)])
    edges = np.histogram_bin_edges(values, bins=bins)
    for label, v in series.items():
        mean_abs = float(np.mean(np.abs(v))) if len(v) else float("nan")
        ax.hist(
            v,
            bins=edges,
            density=True,
            histtype="stepfilled",
            alpha=0.5,
            log=True,
            label=f"{label} (mean |I| = {mean_abs:.3g})",
        )
    ax.set_xlabel("influence score I(z, T)  [d L_T / d ε, L_T summed over T]")
    ax.set_ylabel("probability density (log scale)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    _save(fig, path)


def to_image(x: torch.Tensor, mean, std) -> np.ndarray:
    """Undo the data set's normalisation: (C, H, W) tensor -> (H, W) or (H, W, 3) array in [0, 1]."""
    x = x.detach().cpu().float()
    if mean is not None:
        m = torch.tensor(list(mean)).view(-1, 1, 1)
        s = torch.tensor(list(std)).view(-1, 1, 1)
        x = x * s + m
    x = x.clamp(0, 1)
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()


COLOURS = {"target": "tab:blue", "harmful": "tab:red", "helpful": "tab:green"}


def influence_grid(rows: list[tuple[str, list[tuple[np.ndarray, str, str]]]], path: Path, title: str) -> None:
    """A grid of captioned images, one row per (row label, cells); a cell is (image, caption, kind) and its frame
    is coloured by kind: the target test image (blue), harmful (red) or helpful (green) pretraining images."""
    ncols = max(len(cells) for _, cells in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(1.2 * ncols + 0.8, 1.5 * len(rows) + 0.6), squeeze=False)
    for r, (label, cells) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(cells):
                ax.axis("off")
                continue
            img, caption, kind = cells[c]
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
            ax.set_xlabel(caption, fontsize=6)
            for side in ax.spines.values():
                side.set_edgecolor(COLOURS[kind])
                side.set_linewidth(2)
        axes[r][0].set_ylabel(label, fontsize=7)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


LOO_AXES = (
    "actual ΔL_T = L_T(without z) − L_T(reference)  [nats, summed over T]",
    "predicted ΔL_T = −I(z, T) / m  [nats]",
)
LDS_AXES = (
    "actual ΔL_T = L_T(subset) − L_T(reference)  [nats, summed over T]",
    "predicted Σ_{z left out} −I(z, T) / m  [nats]",
)


def loo_scatter(
    panels: list[tuple[str, np.ndarray, dict]],
    actual: np.ndarray,
    path: Path,
    title: str,
    metric: tuple[str, str] = ("Pearson r", "pearson_r"),
    axes_labels: tuple[str, str] = LOO_AXES,
) -> None:
    """Predicted −I/m against the actual leave-one-out change of L_T, one panel per score set (Figures 2 and 3),
    with the least-squares line and Pearson's r (or the `metric` named: the LDS's Spearman ρ)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    for ax, (label, predicted, stats) in zip(axes[0], panels, strict=True):
        ax.scatter(actual, predicted, s=14, alpha=0.75)
        if np.ptp(actual) > 0:
            xs = np.linspace(actual.min(), actual.max(), 50)
            ax.plot(xs, stats["fit_slope"] * xs + stats["fit_intercept"], color="tab:red", lw=1, label="least squares")
            ax.legend(fontsize=7, loc="upper left")
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        name, key = metric
        ci = stats.get(f"{key}_ci95")
        ci_text = f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else ""
        ax.set_title(f"{label}: {name} = {stats[key]:+.3f}{ci_text}", fontsize=9)
        ax.set_xlabel(axes_labels[0], fontsize=8)
        ax.set_ylabel(axes_labels[1], fontsize=8)
        ax.ticklabel_format(style="sci", scilimits=(-3, 3))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    _save(fig, path)


def cleanse_bars(summary: dict, path: Path, title: str) -> None:
    """Finetune test accuracy and loss per cleansing condition: mean over seeds with ± std error bars, and each
    seed's value as a dot (the paper's Section 4.2 comparison)."""
    labels = {"none": "no removal", "harmful": "most harmful\nremoved", "random": "random\nremoved"}
    colours = {"none": "tab:grey", "harmful": "tab:red", "random": "tab:blue"}
    conds = [c for c in labels if c in summary["conditions"]]
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.8))
    for ax, metric, unit, scale in (
        (axes[0], "test_accuracy", "accuracy (%)", 100.0),
        (axes[1], "test_loss", "mean loss", 1.0),
    ):
        means = [scale * summary["conditions"][c][f"{metric}_mean"] for c in conds]
        stds = [scale * summary["conditions"][c][f"{metric}_std"] for c in conds]
        xs = np.arange(len(conds))
        ax.bar(xs, means, yerr=stds, capsize=6, color=[colours[c] for c in conds], alpha=0.6)
        for x, c in zip(xs, conds, strict=True):
            values = [scale * v for v in summary["conditions"][c][f"{metric}_values"]]
            ax.scatter([x] * len(values), values, color="black", s=10, zorder=3)
        lo = min(m - s for m, s in zip(means, stds, strict=True))
        hi = max(m + s for m, s in zip(means, stds, strict=True))
        pad = max(hi - lo, 1e-3 * max(abs(hi), 1.0))
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xticks(xs, [labels[c] for c in conds], fontsize=8)
        ax.set_ylabel(f"finetune test {unit}", fontsize=8)
        for x, mval, sval in zip(xs, means, stds, strict=True):
            text = f"{mval:.2f} ± {sval:.2f}" if scale > 1 else f"{mval:.4f} ± {sval:.4f}"
            ax.annotate(text, (x, lo - 0.6 * pad), ha="center", va="center", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    _save(fig, path)


def influence_figure(frame, pre, test, norm, top_k: int, path: Path, title: str, what: str) -> None:
    """The paper's Figure 4: the most harmful and most helpful pretraining images for the summed target, or per
    target test image (first 8) when the table is per-test (`test_index` column)."""
    mean, std = (norm.mean, norm.std) if norm is not None else (None, None)

    def cells(f, kind: str) -> list:
        return [
            (
                to_image(pre.x[int(i)], mean, std),
                f"#{int(i)} {pre.class_names[int(pre.y[int(i)])]}\nI={score:.3g}",
                kind,
            )
            for i, score in zip(f["index"], f["score"], strict=True)
        ]

    if "test_index" not in frame:
        ordered = frame.sort_values("score", ascending=False)
        rows = [
            ("most harmful\n(largest I)", cells(ordered.head(top_k), "harmful")),
            ("most helpful\n(smallest I)", cells(ordered.tail(top_k)[::-1], "helpful")),
        ]
    else:
        top_k = min(top_k, 5)
        rows = []
        for t, f in list(frame.groupby("test_index", sort=False))[:8]:
            ordered = f.sort_values("score", ascending=False)
            caption = f"test #{int(t)}\ntrue {f['test_class_name'].iloc[0]}, pred. {f['test_prediction'].iloc[0]}"
            target = (to_image(test.x[int(t)], mean, std), caption, "target")
            rows.append(
                (
                    f"test #{int(t)}",
                    [target, *cells(ordered.head(top_k), "harmful"), *cells(ordered.tail(top_k)[::-1], "helpful")],
                )
            )
        what = f"each target test image (blue), {top_k} most harmful (red), {top_k} most helpful (green)"
    influence_grid(rows, path, f"{title}: pretraining images by influence on {what}")


def removed_figure(rows, scores, pre, norm, path: Path, title: str, per_row: int = 8) -> None:
    """The removed pretraining images (most harmful first), `per_row` to a row."""
    mean, std = (norm.mean, norm.std) if norm is not None else (None, None)
    score = scores.set_index("index")["score"]
    cells = [
        (
            to_image(pre.x[int(i)], mean, std),
            f"#{int(i)} {pre.class_names[int(pre.y[int(i)])]}\nI={score[int(i)]:.3g}",
            "harmful",
        )
        for i in rows
    ]
    influence_grid(
        [
            (f"removed\n{k + 1}-{min(k + per_row, len(cells))}", cells[k : k + per_row])
            for k in range(0, len(cells), per_row)
        ],
        path,
        f"{title}: the {len(cells)} most harmful pretraining images (largest I), removed by cleanse",
    )


def fault_curve(found: dict, path: Path, title: str) -> None:
    """faults.png: the share of the flipped examples found against the share of the pretraining set inspected,
    in score order, in |score| order and by the pretrain-loss baseline, with the random ordering (the diagonal)."""
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    q = np.asarray(found["curve_inspected"])
    ax.plot(q, found["by_score_curve"], label="by score (harmful first)", color="#c0392b")
    ax.plot(q, found["by_abs_score_curve"], label="by |score|", color="#2471a3", ls="--")
    if "by_pretrain_loss_curve" in found:
        ax.plot(q, found["by_pretrain_loss_curve"], label="by pretrain loss (baseline)", color="#7d8c2a", ls=":")
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, label="random order")
    for p in found["inspect"]:
        ax.axvline(p, color="0.85", lw=0.8, zorder=0)
    ax.set_xlabel("fraction of the pretraining set inspected")
    ax.set_ylabel(f"fraction of the {found['flipped']:,} flipped labels found")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=9)
    _save(fig, path)
