"""Benchmark: the speed goals, side by side in one run (the README's performance table).

    .venv-bench/bin/python benchmarks/speed.py         # every row (`make bench-speed`; Kronfluence: the bench venv)
    python benchmarks/speed.py --only targets exact      # the rows whose name contains one of these words

Rows, each timed end to end in this one process (2 threads unless --threads):

* `targets`: per-test influence of 1,000 MNIST test points on every one of the 24,754 pretraining examples, the peer
  problem (single-stage, damping 0.01, Hessian on msif's 1,000-example sample; benchmarks/peerlib/problem.py), from a
  cold start (no cached curvature): msif `lowrank` grown by Krylov blocks of the targets' remainder (`block`,
  `steps`), plain `lowrank`, and Kronfluence EK-FAC pairwise scores when installed. Accuracy: for --check test points
  drawn with a fixed seed before anything runs, the Pearson r of each method's scores with that point's converged
  `lanczos` solve (tol 1e-6), mean and minimum; the reference's own time per point is projected to 1,000.
* `cifar fixed`, `cifar updated`: `msif influence` at the defaults on the CIFAR-10 checkpoints (trained first if
  missing), computed in memory (no run folder written), every step timed, each solve's residual; the paper's time
  for this step is 230 s on one V100 (200 CG iterations).
* `exact digits`: `solver=exact` on the embedded 8x8 digits, case fixed (a 5,316-parameter pretrain Hessian).
* `scoring`: msif scoring of all MNIST pretraining examples against the fastest plain forward pass over them, and
  its peak memory while scoring m, 2m and 4m examples from a memory-mapped file (benchmarks/peers.py's worker).
* `calibration`, first and last: a fixed float32 matrix product and a fixed forward pass of the MNIST network, so
  runs on different days (this machine's speed has varied by 1.8x) and drift within one run can be told apart from
  changes in msif.

Results: <outputs>/benchmarks/speed.json and speed.md (the table the README shows).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from peerlib.problem import build_problem, pearson  # noqa: E402

PAPER_CIFAR_SECONDS = 230.0  # Chen et al. 2020, Section 4: all CIFAR pretraining examples, one V100


def targets_rows(args, console) -> list[dict]:
    from msif.influence import SingleStageInfluence

    p = build_problem(args.dataset, args.targets, 1000, 0.01)
    K = len(p.y_test)
    check = np.sort(np.random.default_rng(args.seed).choice(K, min(args.check, K), replace=False))

    def model(solver: dict) -> SingleStageInfluence:
        return SingleStageInfluence(p.net, (p.x_train, p.y_train), solver=solver, hessian_sample=1000, batch_size=256)

    console.print(f"[bold]targets[/]: converged lanczos for {len(check)} of the {K:,} test points (the reference)")
    start = time.perf_counter()
    lanczos = model({"method": "lanczos", "damping": p.damping, "iterations": 100, "tol": 1e-6})
    ref = lanczos.influence(p.x_test[check], p.y_test[check], per_test=True).double().numpy()
    ref_seconds = time.perf_counter() - start
    rows = [
        {
            "row": f"targets: lanczos (tol 1e-6), converged, per test point, {K:,} projected",
            "seconds": ref_seconds / len(check) * K,
            "projected": True,
            "residual": lanczos.trace.solves[-1].residual,
            "hvps": lanczos.trace.solves[-1].hvps,
            "note": f"measured {ref_seconds:.1f} s for {len(check)} points",
        }
    ]

    def accuracy(scores: np.ndarray, columns) -> dict:
        rs = [pearson(scores[:, c], ref[:, j]) for j, c in enumerate(columns)]
        return {"r_mean": float(np.mean(rs)), "r_min": float(np.min(rs))}

    solvers = [(f"lowrank rank {r} + {b}×{s} target blocks", r, b, s) for r, b, s in args.blocks]
    solvers.append((f"lowrank rank {args.plain_rank}", args.plain_rank, 0, 1))
    for label, rank, block, steps in solvers:
        solver = {"method": "lowrank", "damping": p.damping, "rank": rank, "block": block, "steps": steps}
        start = time.perf_counter()
        ssi = model(solver | {"tol": 1e-6, "max_residual": 1e9})  # no cache_dir: the Ritz pairs are fitted here
        scores = ssi.influence(p.x_test, p.y_test, per_test=True).double().numpy()
        seconds = time.perf_counter() - start
        report = ssi.trace.solves[-1]
        rows.append(
            {"row": f"targets: msif {label}", "seconds": seconds, "hvps": report.hvps, "residual": report.residual}
            | accuracy(scores, check)
            | {"steps": dict(ssi.trace.seconds)}
        )
        console.print(rows[-1])
    try:
        from peerlib.kronfluence_methods import pairwise_per_test
    except ImportError:
        rows.append({"row": "targets: Kronfluence EK-FAC pairwise", "note": "not installed (make bench-venv)"})
    else:
        start = time.perf_counter()
        scores = pairwise_per_test(p, "ekfac")
        rows.append(
            {"row": "targets: Kronfluence EK-FAC pairwise", "seconds": time.perf_counter() - start}
            | accuracy(scores, check)
            | {"note": "approximates (G + λI)⁻¹, G its Fisher, not msif's (H² + λI)⁻¹H"}
        )
        console.print(rows[-1])
    return rows


def stage_row(label: str, overrides: list[str], console) -> dict:
    from hydra import compose, initialize_config_dir

    from msif.config import CONF_DIR
    from msif.lifecycle import Context
    from msif.stages.finetune import finetuned
    from msif.stages.influence import Upstream, build_influence

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("influence", overrides=overrides)
    ctx = Context(cfg)
    pre, fin = finetuned(cfg, ctx)
    test = ctx.tasks(cfg).finetune.test
    torch.set_grad_enabled(True)
    start = time.perf_counter()
    msi = build_influence(cfg, Upstream(pre, fin), ctx)
    S = msi.target_vectors(test.x, test.y)
    msi.score(S)
    seconds = time.perf_counter() - start
    solves = {s.label: {"method": s.method, "residual": s.residual, "hvps": s.hvps} for s in msi.trace.solves}
    row = {"row": label, "seconds": seconds, "steps": dict(msi.trace.seconds), "solves": solves}
    row["residual"] = max(s["residual"] for s in solves.values()) if solves else None
    console.print(row)
    return row


def scoring_row(console) -> dict:
    from peers import scoring_worker

    p = build_problem("mnist", 500, 1000, 0.01)
    out = scoring_worker(p)
    best = min(out["jvp"], out["per_example"])
    row = {
        "row": "scoring: all MNIST pretraining examples, msif vs the fastest forward pass",
        "seconds": best,
        "ratio": best / out["forward"],
        "note": f"forward {out['forward']:.2f} s (batch {out['forward_batch']}), jvp {out['jvp']:.2f} s, per-example "
        f"{out['per_example']:.2f} s; peak memory "
        + ", ".join(f"{int(k):,}: +{v:.0f} MiB" for k, v in out["memory_mib"].items()),
    } | {"detail": out}
    console.print(row)
    return row


def calibration_row(when: str, console) -> dict:
    """The machine's speed now: the best of 5 float32 products of two 1,024 x 1,024 matrices, and the best of 5
    forward passes of the MNIST network over 1,024 fixed random images (no data, no msif code)."""
    from omegaconf import OmegaConf

    import msif
    from msif.models import build_pretrain_net

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1024, 1024, generator=g), torch.randn(1024, 1024, generator=g)
    model = OmegaConf.load(Path(msif.__file__).parent / "conf" / "model" / "mnist.yaml")
    net = build_pretrain_net(model, (1, 28, 28), 4, seed=0)
    x = torch.randn(1024, 1, 28, 28, generator=g)

    def best(fn) -> float:
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    matmul = best(lambda: a @ b)
    with torch.no_grad():
        forward = best(lambda: net(x))
    row = {
        "row": f"calibration ({when}): MNIST network forward over 1,024 images",
        "seconds": forward,
        "note": f"matmul 1,024^3: {2 * 1024**3 / matmul / 1e9:.1f} GFLOP/s",
    }
    console.print(row)
    return row


def markdown(rows: list[dict], threads: int) -> str:
    lines = [
        f"| row | seconds | r mean / min vs converged | largest residual | note |  (`benchmarks/speed.py`, {threads} "
        "threads)",
        "|---|---:|---|---:|---|",
    ]
    for r in rows:
        sec = r.get("seconds")
        sec = "" if sec is None else (f"~{sec:,.0f} (projected)" if r.get("projected") else f"{sec:,.1f}")
        acc = f"{r['r_mean']:.4f} / {r['r_min']:.4f}" if "r_mean" in r else ""
        res = f"{r['residual']:.1e}" if r.get("residual") is not None else ""
        note = r.get("note", "") + (f" ({r['ratio']:.2f}× the forward pass)" if "ratio" in r else "")
        lines.append(f"| {r['row']} | {sec} | {acc} | {res} | {note} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", default=None, help="rows whose name contains one of these words")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dataset", default="mnist", help="of the many-targets row (digits: a quick check)")
    ap.add_argument("--targets", type=int, default=1000, help="test points of the many-targets row")
    ap.add_argument("--check", type=int, default=10, help="test points checked against converged solves")
    ap.add_argument("--seed", type=int, default=0, help="of the checked test points")
    ap.add_argument("--plain-rank", type=int, default=100)
    ap.add_argument(
        "--blocks", type=lambda s: tuple(int(v) for v in s.split(",")), nargs="*", default=[(100, 32, 2)],
        help="rank,block,steps of each lowrank + target-block row",
    )  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from msif.allocator import keep_freed_memory

    allocator = keep_freed_memory()  # as the msif command does (MSIF_KEEP_FREED_MEMORY=0: glibc's defaults)
    from rich.console import Console

    from msif.io import atomic_write_json, atomic_write_text

    console = Console(width=150)
    wanted = lambda name: not args.only or any(w in name for w in args.only)  # noqa: E731
    rows: list[dict] = [calibration_row("first", console)]
    if wanted("targets"):
        rows += targets_rows(args, console)
    for case in ("fixed", "updated"):
        if wanted(f"cifar {case}") or wanted("cifar"):
            label = f"cifar {case}: msif influence at the defaults, all 10,000 pretraining examples"
            rows.append(stage_row(label, ["dataset=cifar", f"case={case}"], console))
    if wanted("exact"):
        rows.append(stage_row("exact digits: solver=exact, case fixed", ["dataset=digits", "case=fixed",
                                                                          "solver=exact"], console))  # fmt: skip
    if wanted("scoring"):
        rows.append(scoring_row(console))
    rows.append(calibration_row("last", console))
    out = Path(os.environ.get("MSIF_OUTPUTS", "outputs")) / "benchmarks"
    record = {"rows": rows, "threads": args.threads, "paper_cifar_seconds": PAPER_CIFAR_SECONDS,
              "keep_freed_memory": allocator}  # fmt: skip
    atomic_write_json(record, out / "speed.json")
    atomic_write_text(markdown(rows, args.threads), out / "speed.md")
    console.print(markdown(rows, args.threads))
    console.print(f"saved {out / 'speed.json'} and {out / 'speed.md'}")


if __name__ == "__main__":
    main()
