"""Check the kronfluence and dattri adapters against msif's exact solver on the small digits problem.

    MSIF_DATA=/work/data OMP_NUM_THREADS=1 .venv-bench/bin/python benchmarks/peerlib/check_kronfluence_dattri.py
        [--damping 0.01] [--ref /tmp/ref.npy] [--only kronfluence|dattri] [--match TEXT] [--mnist --threads 2]

Prints one line per method: label, Pearson r with the exact scores, norm ratio ‖method‖/‖exact‖, seconds. The digits
Hessian (300 rows, 5,316 parameters) has smallest eigenvalue about −0.002, so H + 0.1 I is positive definite and the
exact (H + λI)⁻¹ is well defined (so is H + 0.01 I: `--damping 0.01`). `--mnist` instead runs every method once on
the MNIST problem (timing only, no reference).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ -> import peerlib

from peerlib.problem import build_problem, pearson  # noqa: E402


def _methods(which: str) -> dict:
    methods = {}
    if which in ("all", "kronfluence"):
        from peerlib.kronfluence_methods import METHODS as K

        methods.update(K)
    if which in ("all", "dattri"):
        from peerlib.dattri_methods import METHODS as D

        methods.update(D)
    return methods


def _state(net) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="all", choices=["all", "kronfluence", "dattri"])
    ap.add_argument("--match", default="", help="run only labels containing one of these comma-separated texts")
    ap.add_argument("--mnist", action="store_true", help="run once on MNIST (timing; no reference)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--damping", type=float, default=0.1, help="digits damping (H + 0.01 I is also positive definite)")
    ap.add_argument("--ref", default=None, help="a .npy file caching the digits reference (read if present)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = {k: v for k, v in _methods(args.only).items() if any(m in k for m in args.match.split(","))}

    if args.mnist:
        p = build_problem("mnist")
        ref = None
    else:
        p = build_problem("digits", test_points=100, hessian_sample=300, damping=args.damping)
        from msif.influence import SingleStageInfluence

        t = time.perf_counter()
        if args.ref and Path(args.ref).exists():
            ref = np.load(args.ref)
        else:
            solver = {"method": "exact", "damping": p.damping, "max_params": 10000}
            ss = SingleStageInfluence(p.net, (p.x_train, p.y_train), solver=solver, hessian_sample=300)
            ref = ss.influence(p.x_test, p.y_test).double().numpy()
            if args.ref:
                np.save(args.ref, ref)
        print(f"{'msif exact (reference)':48s} {'':>9s} {'':>9s} {time.perf_counter() - t:8.1f}s", flush=True)
    n_params = sum(q.numel() for q in p.net.parameters())
    print(f"# m={p.m} params={n_params} hessian={len(p.hessian_index)} test={len(p.y_test)} damping={p.damping}")
    print(f"{'method':48s} {'r':>9s} {'norm':>9s} {'seconds':>9s}", flush=True)
    before = _state(p.net)
    for label, fn in methods.items():
        t = time.perf_counter()
        try:
            s = fn(p)
        except Exception as err:  # report and go on
            print(f"{label:48s} FAILED {type(err).__name__}: {err}", flush=True)
            continue
        sec = time.perf_counter() - t
        assert isinstance(s, np.ndarray) and s.dtype == np.float64 and s.shape == (p.m,), (label, type(s), s.shape)
        changed = any(not torch.equal(before[k], v) for k, v in p.net.state_dict().items())
        flag = " NET CHANGED!" if changed else ""
        flag += "" if np.isfinite(s).all() else " NON-FINITE!"
        if ref is None:
            print(f"{label:48s} {'':>9s} {'':>9s} {sec:8.1f}s  |s|={np.linalg.norm(s):.4g}{flag}", flush=True)
        else:
            r, ratio = pearson(s, ref), np.linalg.norm(s) / np.linalg.norm(ref)
            print(f"{label:48s} {r:9.5f} {ratio:9.4f} {sec:8.1f}s{flag}", flush=True)


if __name__ == "__main__":
    main()
