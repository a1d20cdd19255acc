"""Benchmark: how fast each msif IHVP solver reaches a trustworthy single-stage influence score.

    python benchmarks/solver_accuracy.py                  # MNIST 0-3 pretraining network, profile cpu
    python benchmarks/solver_accuracy.py dataset=digits   # any `msif influence` override works

The setting every influence library shares: the influence of all pretraining examples on the summed loss
of the first 500 test examples of the same task, on the same trained network, damping 0.01, Hessian on 1,000
examples. A converged reference (cg_normal run until its relative residual is below 1e-7, or 1,000 iterations) is
computed first; then each solver setting is timed end to end (target gradient, solve, scoring every example) in this
one run, and its scores are compared with the reference by Pearson r. Results go to
<output_root>/benchmarks/solver_accuracy_<dataset>.json.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from peerlib.problem import pearson  # benchmarks/ is on sys.path when this file runs as a script

import msif  # noqa: F401
from msif.config import CONF_DIR
from msif.console import console, table
from msif.influence import SingleStageInfluence
from msif.io import atomic_write_json
from msif.lifecycle import Context
from msif.stages.pretrain import pretrained

DAMPING = 0.01
SETTINGS = [("cg_normal", {"iterations": n}) for n in (5, 10, 20, 30, 50)] + [
    ("cg", {"iterations": 50}),
    ("lissa", {"depth": 200}),
    ("identity", {}),
]


def run(pre, tasks, x_T, y_T, solver: dict, device) -> tuple[np.ndarray, float, object]:
    start = time.perf_counter()
    ssi = SingleStageInfluence(pre.net, tasks.pretrain.train, solver=solver, hessian_sample=1000, device=device)
    scores = ssi.influence(x_T, y_T)
    return scores.double().numpy(), time.perf_counter() - start, ssi.trace


def main(overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("influence", overrides=["dataset=mnist", "mode=single_stage", *overrides])
    ctx = Context(cfg)
    tasks = ctx.tasks(cfg)
    pre = pretrained(cfg, ctx)
    x_T, y_T = tasks.pretrain.test.x[:500], tasks.pretrain.test.y[:500]  # the first 500 test points
    base = {"damping": DAMPING, "tol": 1e-7, "max_residual": 1e9}
    reference, ref_seconds, ref_trace = run(
        pre, tasks, x_T, y_T, {"method": "cg_normal", "iterations": 1000, **base}, ctx.device
    )
    ref_solve = ref_trace.solves[-1]
    rows, results = [], []
    for method, extra in SETTINGS:
        solver = {"method": method, **base, "tol": 1e-12, **extra}
        try:
            scores, seconds, trace = run(pre, tasks, x_T, y_T, solver, ctx.device)
            r = pearson(scores, reference)
            residual = trace.solves[-1].residual
        except msif.MsifError as err:
            scores, seconds, r, residual = None, float("nan"), float("nan"), float("nan")
            console.print(f"{method} {extra}: {err.message}")
        label = f"{method} " + " ".join(f"{k}={v}" for k, v in extra.items())
        rows.append([label, f"{seconds:.1f}", f"{r:+.4f}", f"{residual:.1e}"])
        results.append({"solver": label, "seconds": seconds, "pearson_r": r, "residual": residual})
    console.print(
        table(
            f"single-stage influence of m={len(tasks.pretrain.train):,} {cfg.dataset.name} examples on 500 test "
            f"points, damping {DAMPING}, Hessian on 1,000 examples; reference: cg_normal, {ref_solve.iterations} "
            f"iterations, residual {ref_solve.residual:.1e}, {ref_seconds:.0f} s ({torch.get_num_threads()} threads)",
            ["solver", "seconds", "r vs reference", "final residual"],
            rows,
        )
    )
    out = Path(cfg.output_root) / "benchmarks" / f"solver_accuracy_{cfg.dataset.name}.json"
    atomic_write_json(
        {
            "reference": {"seconds": ref_seconds, "iterations": ref_solve.iterations, "residual": ref_solve.residual},
            "results": results,
            "threads": torch.get_num_threads(),
            "overrides": overrides,
        },
        out,
    )
    console.print(f"saved {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
