"""Correctness check of the pyDVL and captum adapters against msif's exact solver, on the small digits problem.

    cd /work/main && MSIF_DATA=/work/data OMP_NUM_THREADS=1 \
        .venv-bench/bin/python benchmarks/peerlib/check_pydvl_captum.py [--damping 0.1] [--only SUBSTRING]
        [--dataset digits] [--test-points 100] [--hessian-sample 300] [--no-extras] [--ref-cache FILE.npy]

One line per method: label, Pearson r with msif's exact scores, ‖method‖/‖exact‖, sign agreement (sum of
method·exact > 0), seconds. Besides the METHODS of both adapters it runs converged variants (pyDVL Direct, pyDVL CG
with 300 iterations, captum Naive at full rank), which must give r > 0.999 and a norm ratio within a few %, and
pyDVL EK-FAC, which is expected to fail on msif's convolutional networks.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from peerlib import captum_methods, pydvl_methods  # noqa: E402
from peerlib.problem import build_problem, pearson  # noqa: E402


def reference(p, hessian_sample: int) -> np.ndarray:
    from msif.influence import SingleStageInfluence

    solver = {"method": "exact", "damping": p.damping, "max_params": 10000}
    s = SingleStageInfluence(p.net, (p.x_train, p.y_train), solver=solver, hessian_sample=hessian_sample)
    assert torch.equal(s.hessian_index, p.hessian_index), "msif and the problem use different Hessian samples"
    return s.influence(p.x_test, p.y_test).double().numpy()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--test-points", type=int, default=100)
    ap.add_argument("--hessian-sample", type=int, default=300)
    ap.add_argument("--damping", type=float, default=0.1)
    ap.add_argument("--only", default=None, help="run only labels containing this substring")
    ap.add_argument("--no-extras", action="store_true", help="skip the converged / expected-to-fail extras")
    ap.add_argument("--ref-cache", default=None, help="an .npy file to load the msif reference from / save it to")
    args = ap.parse_args()
    warnings.simplefilter("ignore", FutureWarning)

    p = build_problem(
        args.dataset, test_points=args.test_points, hessian_sample=args.hessian_sample, damping=args.damping
    )
    n_params = sum(q.numel() for q in p.net.parameters())
    print(
        f"{args.dataset}: m={p.m}, params={n_params}, |T|={len(p.y_test)}, Hessian sample={len(p.hessian_index)}, "
        f"damping={p.damping}"
    )
    before = [q.detach().clone() for q in p.net.parameters()]

    t = time.perf_counter()
    if args.ref_cache and os.path.exists(args.ref_cache):
        ref = np.load(args.ref_cache)
    else:
        ref = reference(p, args.hessian_sample)
        if args.ref_cache:
            np.save(args.ref_cache, ref)
    print(f"msif exact reference: {time.perf_counter() - t:.1f}s, norm {np.linalg.norm(ref):.4g}")

    methods = {}
    if not args.no_extras:
        methods["pydvl direct (converged)"] = pydvl_methods.pydvl_direct
        methods["pydvl cg (300 it, converged)"] = pydvl_methods.pydvl_cg(300)
        methods["captum naive (full rank, converged)"] = captum_methods.captum_naive
    methods.update(pydvl_methods.METHODS)
    methods.update(captum_methods.METHODS)
    if not args.no_extras:
        methods["pydvl ekfac (expected to fail: Conv2d)"] = pydvl_methods.pydvl_ekfac

    print(f"{'method':52s} {'r':>8s} {'norm ratio':>10s} {'sign':>5s} {'seconds':>8s}")
    for label, fn in methods.items():
        if args.only and args.only not in label:
            continue
        t = time.perf_counter()
        try:
            s = fn(p)
        except Exception as e:  # report and go on
            print(f"{label:52s} FAILED after {time.perf_counter() - t:.1f}s: {type(e).__name__}: {e}".splitlines()[0])
            if os.environ.get("CHECK_TRACEBACK"):
                traceback.print_exc()
            continue
        sec = time.perf_counter() - t
        assert s.shape == (p.m,) and s.dtype == np.float64, (s.shape, s.dtype)
        r = pearson(s, ref)
        ratio = np.linalg.norm(s) / np.linalg.norm(ref)
        sign = "+" if float(s @ ref) > 0 else "-"
        print(f"{label:52s} {r:8.5f} {ratio:10.4f} {sign:>5s} {sec:8.1f}", flush=True)

    after = list(p.net.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), "a method modified p.net's parameters"
    print("p.net unchanged")


if __name__ == "__main__":
    main()
