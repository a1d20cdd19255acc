"""Benchmark: the cost of per-test influence for 1, 10, 100 and 1,000 test points at once.

    python benchmarks/many_targets.py                        # MNIST 0-3 network, single-stage, damping 0.01
    python benchmarks/many_targets.py --dataset digits --k 1 10 100

For K test points (the first K of the test set), each solver computes one solved vector per test point and scores
every pretraining example against all K in one pass (msif.influence.scoring, `auto`: per-example gradients
contracted with the K vectors once that is measured faster). Timed end to end in this one run, 2 threads:

* `lanczos`: a converged solve per test point (tol 1e-6), K columns vmapped together in blocks of 32;
* `lowrank` (rank r): the Hessian's Ritz pairs fitted once (r HVPs, cached; its time is listed as `fit`), then every
  target is two small matrix products.

Accuracy: for the first 10 test points, the Pearson r of each solver's scores with the converged lanczos scores of
the same test point (mean and minimum over the 10; the K = 10 lanczos row is that reference run). `lanczos` is skipped
for a K whose projected time, from the measured cost per test point at the previous K, exceeds --budget seconds (the
projection is printed as such).
Results: <outputs>/benchmarks/many_targets_<dataset>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peerlib.problem import pearson  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--k", type=int, nargs="*", default=[1, 10, 100, 1000])
    ap.add_argument("--ranks", type=int, nargs="*", default=[100])
    ap.add_argument("--damping", type=float, default=0.01)
    ap.add_argument("--hessian-sample", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=float, default=600.0, help="seconds allowed for one lanczos row")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from peerlib.problem import build_problem
    from rich.console import Console
    from rich.table import Table

    from msif.influence import SingleStageInfluence
    from msif.io import atomic_write_json

    console = Console(width=150)
    p = build_problem(args.dataset, max(args.k), args.hessian_sample, args.damping)
    K_max = min(max(args.k), len(p.y_test))
    ks = [k for k in args.k if k <= K_max]

    def model(solver: dict) -> SingleStageInfluence:
        return SingleStageInfluence(
            p.net, (p.x_train, p.y_train), solver=solver, hessian_sample=args.hessian_sample, batch_size=256
        )

    def per_test(ssi: SingleStageInfluence, k: int) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        chunk = k if ssi.solver["method"] == "lowrank" else 32  # lowrank: all targets in one pair of matrix products
        blocks = [ssi.target_vectors(p.x_test[i : min(k, i + chunk)], p.y_test[i : min(k, i + chunk)], per_test=True)
                  for i in range(0, k, chunk)]  # fmt: skip
        scores = ssi.score(torch.cat(blocks)).double().numpy()
        return scores, time.perf_counter() - start

    exact_solver = {"method": "lanczos", "damping": args.damping, "iterations": 100, "tol": 1e-6}
    n_ref = min(10, K_max)
    console.print(f"[bold]reference[/]: converged lanczos per test point for the first {n_ref} test points")
    ref, ref_seconds = per_test(model(exact_solver), n_ref)
    rows, record = [], {"problem": {"dataset": args.dataset, "m": p.m, "damping": args.damping}, "rows": []}

    def accuracy(scores: np.ndarray) -> tuple[float, float]:
        rs = [pearson(scores[:, j], ref[:, j]) for j in range(min(n_ref, scores.shape[1]))]
        return float(np.mean(rs)), float(np.min(rs))

    per_point = None
    for k in ks:
        if per_point is not None and per_point * k > args.budget:
            rows.append(["lanczos (tol 1e-6)", f"{k:,}", f"~{per_point * k:,.0f} (projected)", "", "", ""])
            record["rows"].append({"solver": "lanczos", "k": k, "projected_seconds": per_point * k})
            continue
        scores, sec = (ref, ref_seconds) if k == n_ref else per_test(model(exact_solver), k)  # the reference run
        per_point = sec / k
        r_mean, r_min = accuracy(scores)
        rows.append(["lanczos (tol 1e-6)", f"{k:,}", f"{sec:.1f}", f"{sec / k:.2f}", f"{r_mean:.4f}", f"{r_min:.4f}"])
        record["rows"].append({"solver": "lanczos", "k": k, "seconds": sec, "r_mean": r_mean, "r_min": r_min})
        console.print(rows[-1])
    for rank in args.ranks:
        ssi = model({"method": "lowrank", "damping": args.damping, "rank": rank, "tol": 1e-6, "max_residual": 1e9})
        start = time.perf_counter()
        from msif.influence.curvature import ritz_curvature

        ritz_curvature(ssi.H, rank)
        fit = time.perf_counter() - start
        rows.append([f"lowrank (rank {rank}): fit", "", f"{fit:.1f}", "", "", ""])
        for k in ks:
            scores, sec = per_test(ssi, k)
            r_mean, r_min = accuracy(scores)
            residual = ssi.trace.solves[-1].residual
            rows.append([f"lowrank (rank {rank})", f"{k:,}", f"{sec:.1f}", f"{sec / k:.2f}", f"{r_mean:.4f}",
                         f"{r_min:.4f}"])  # fmt: skip
            record["rows"].append(
                {
                    "solver": f"lowrank-{rank}",
                    "k": k,
                    "seconds": sec,
                    "fit_seconds": fit,
                    "r_mean": r_mean,
                    "r_min": r_min,
                    "residual": residual,
                }  # fmt: skip
            )
            console.print(rows[-1])
    tab = Table(
        title=f"per-test influence, {args.dataset}: m = {p.m:,}, damping {args.damping:g}, {args.threads} threads"
    )
    for col in ("solver", "test points K", "seconds", "s per test point", "r mean (10)", "r min (10)"):
        tab.add_column(col, justify="left" if col == "solver" else "right")
    for row in rows:
        tab.add_row(*row)
    console.print(tab)
    out = Path(os.environ.get("MSIF_OUTPUTS", "outputs")) / "benchmarks" / f"many_targets_{args.dataset}.json"
    atomic_write_json(record | {"reference_seconds": ref_seconds, "threads": args.threads}, out)
    console.print(f"saved {out}")


if __name__ == "__main__":
    main()
