"""Benchmark: msif's single-stage influence against the libraries users would otherwise pick, in one run.

    python benchmarks/peers.py                         # MNIST 0-3 network: every msif solver and every peer installed
    python benchmarks/peers.py --only kronfluence msif  # methods whose label contains one of these words
    python benchmarks/peers.py --dataset digits         # the embedded 8x8 digits (seconds)

Peers are an optional extra, best in their own virtual environment (they pin numpy 1.x): `make bench-venv`, then
`.venv-bench/bin/python benchmarks/peers.py` (`make bench-peers`). A peer that is not installed is listed as skipped.

The problem every library shares: the influence of every pretraining example on the summed loss of the first 500 test
examples, on msif's trained pretraining network, damping λ = 0.01, Hessian of the mean loss on msif's fixed sample of
1,000 examples (benchmarks/peerlib/problem.py). Each method runs in its own process (so that its memory and time are
its own, with the same number of threads), after the data and network are loaded; it reports wall seconds and its peak
memory above what the process held before it started (Linux VmHWM, reset just before). Scores are compared by Pearson
r with two converged references computed in the same run:

* `reference`: msif's target, the paper's (H² + λI)⁻¹ H b (Section 3.3), by CG to a relative residual of 1e-7;
* `reference (H+λI)⁻¹`: what the peers approximate, (H + λI)⁻¹ b, by CG on its normal equations to 1e-7 (H is
  indefinite, so plain CG cannot be the reference).

The run also times, in one worker, the fastest plain forward pass over every training example (best batch size of
64-512) against msif's scoring of all of them (the scoring goal: at most 2x the forward pass), and msif's peak
scoring memory at m/4, m/2 and m examples.
Results: <outputs>/benchmarks/peers_<dataset>.json and .md (the table the README shows).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from peerlib.problem import forward_floor, pearson  # noqa: E402

LIBRARIES = ("msif", "kronfluence", "dattri", "pydvl", "captum")
SCORING = "msif scoring vs forward"


def registry() -> tuple[dict, dict[str, str]]:
    """label -> function for msif and every importable peer; library -> why it was skipped."""
    methods, skipped = {}, {}
    for lib in LIBRARIES:
        try:
            importlib.import_module(lib if lib != "pydvl" else "pydvl.influence")
            mod = importlib.import_module(f"peerlib.{lib}_methods")
        except ImportError as err:
            skipped[lib] = f"not installed here ({err}); `make bench-venv` installs the peers"
            continue
        methods.update(mod.METHODS)
        if lib == "msif":
            methods.update(mod.REFERENCES)
    return methods, skipped


# ---------------------------------------------------------------- worker side (one method per process)


def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # MiB
    return float("nan")


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def measured(fn):
    """(result, seconds, peak MiB above the RSS before the call)."""
    import gc

    gc.collect()
    base = _status("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    return out, seconds, _status("VmHWM") - base


def scoring_worker(p) -> dict:
    """The fastest plain forward pass over every training example (`forward_floor`) vs msif scoring them (jvp and
    per-example gradients, msif's default batch size), best of three interleaved rounds each; then msif's peak
    memory while scoring the first m/4, m/2 and m examples."""
    from msif.influence import SingleStageInfluence

    ssi = SingleStageInfluence(p.net, (p.x_train, p.y_train), solver={"method": "identity"})
    S = ssi.target_vectors(p.x_test, p.y_test)

    def scoring(method):
        def run():
            ssi.score_method = method  # set when timed, not when the closure is made
            return ssi.score(S)

        return run

    out = {"forward": float("inf"), "jvp": float("inf"), "per_example": float("inf")}
    for _ in range(3):  # interleaved rounds, best of each: this machine's speed drifts by tens of percent
        floor, batch = forward_floor(ssi.net, p.x_train, p.y_train, repeats=1)
        if floor < out["forward"]:
            out["forward"], out["forward_batch"] = floor, batch
        for name in ("jvp", "per_example"):
            out[name] = min(out[name], measured(scoring(name))[1])
    out["memory_mib"] = scoring_memory(p, S)
    return out


def peak_anon_mib(fn) -> float:
    """Peak anonymous resident memory (RssAnon: heap, tensors; not the page cache of a memory-mapped file) above the
    level before `fn` ran, sampled every 2 ms in a thread."""
    import threading

    base, peak, done = _status("RssAnon"), [0.0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _status("RssAnon"))
            time.sleep(0.002)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return max(peak[0], _status("RssAnon")) - base


def scoring_memory(p, S) -> dict[str, float]:
    """msif scoring of m, 2m and 4m examples read from a memory-mapped file (the pretraining set repeated), as a
    pretraining set larger than memory would be: peak anonymous memory above the level before scoring."""
    import gc

    import torch

    from msif.influence import SingleStageInfluence

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "x.npy"
        x4 = np.lib.format.open_memmap(file, mode="w+", dtype=np.float32, shape=(4 * p.m, *p.x_train.shape[1:]))
        for c in range(4):
            x4[c * p.m : (c + 1) * p.m] = p.x_train.numpy()
        x4.flush()
        del x4
        x_mm = torch.from_numpy(np.load(file, mmap_mode="r+"))  # r+: torch wants a writable array; nothing is written
        y4 = p.y_train.repeat(4)
        for k in (p.m, 2 * p.m, 4 * p.m):
            ssi = SingleStageInfluence(p.net, (x_mm[:k], y4[:k]), solver={"method": "identity"}, batch_size=512)
            ssi.score_method = "jvp"
            gc.collect()
            out[str(k)] = peak_anon_mib(lambda ssi=ssi: ssi.score(S))
    return out


def worker(args) -> None:
    import torch
    from peerlib.problem import build_problem

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    p = build_problem(args.dataset, args.test_points, args.hessian_sample, args.damping)
    if args.worker == SCORING:
        result = scoring_worker(p)
        Path(args.out).write_text(json.dumps(result))
        return
    fn = registry()[0][args.worker]
    scores, seconds, peak = measured(lambda: fn(p))
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.shape != (p.m,):
        raise SystemExit(f"{args.worker}: returned {scores.shape} scores, expected ({p.m},)")
    np.savez(args.out, scores=scores, seconds=seconds, peak_mib=peak)


# ---------------------------------------------------------------- driver side


def run_worker(label: str, args, tmp: Path, timeout: int) -> tuple[dict | None, str]:
    out = tmp / f"{abs(hash(label))}.{'json' if label == SCORING else 'npz'}"
    cmd = [sys.executable, __file__, "--worker", label, "--out", str(out), *problem_args(args)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"over the {timeout} s limit"
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return None, f"failed: {tail[0][:200]}"
    if label == SCORING:
        return json.loads(out.read_text()), f"{time.perf_counter() - start:.0f} s"
    data = np.load(out)
    return {"scores": data["scores"], "seconds": float(data["seconds"]), "peak_mib": float(data["peak_mib"])}, ""


def problem_args(args) -> list[str]:
    return [
        "--dataset", args.dataset, "--test-points", str(args.test_points), "--hessian-sample",
        str(args.hessian_sample), "--damping", str(args.damping), "--threads", str(args.threads),
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--test-points", type=int, default=500)
    ap.add_argument("--hessian-sample", type=int, default=1000)
    ap.add_argument("--damping", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", default=None, help="run the methods whose label contains one of these")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds allowed per method")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    methods, skipped = registry()
    refs = ["reference", "reference (H+λI)⁻¹"]
    chosen = [k for k in methods if k not in refs and (not args.only or any(w in k for w in args.only))]
    results: dict[str, dict] = {}
    notes: dict[str, str] = {}
    output_root = Path(os.environ.get("MSIF_OUTPUTS", "outputs"))
    with tempfile.TemporaryDirectory() as tmp:
        for label in [*refs, SCORING, *chosen]:
            console.print(f"[bold]{label}[/] ...", end=" ")
            limit = args.timeout if label in chosen else max(args.timeout, 3600)  # the references must finish
            res, note = run_worker(label, args, Path(tmp), limit)
            console.print(note or f"{res['seconds']:.1f} s, peak +{res['peak_mib']:.0f} MiB")
            if res is None:
                if label in refs[:1]:
                    raise SystemExit(f"the reference failed ({note}); nothing to compare with")
                notes[label] = note
            else:
                results[label] = res
    ref = results["reference"]["scores"]
    inv = results.get("reference (H+λI)⁻¹", {}).get("scores")
    rows = []
    for label in [*refs, *chosen]:
        res = results.get(label)
        if res is None:
            rows.append({"method": label, "note": notes.get(label, "")})
            continue
        rows.append(
            {
                "method": label,
                "seconds": res["seconds"],
                "peak_mib": res["peak_mib"],
                "r_reference": pearson(res["scores"], ref),
                "r_inverse": pearson(res["scores"], inv) if inv is not None else float("nan"),
                "note": "",
            }
        )
    for lib, why in skipped.items():
        rows.append({"method": lib, "note": f"skipped: {why}"})

    p_desc = (
        f"{args.dataset}: influence of every pretraining example on the summed loss of {args.test_points} test "
        f"examples, damping {args.damping:g}, Hessian on {args.hessian_sample:,} examples, {args.threads} threads"
    )
    tab = Table(title=p_desc)
    for col in ("method", "seconds", "peak MiB", "r vs reference", "r vs (H+λI)⁻¹", "note"):
        tab.add_column(col, justify="left" if col in ("method", "note") else "right")
    for r in rows:
        if "seconds" in r:
            tab.add_row(r["method"], f"{r['seconds']:.1f}", f"{r['peak_mib']:.0f}", f"{r['r_reference']:.4f}",
                        f"{r['r_inverse']:.4f}", r["note"])  # fmt: skip
        else:
            tab.add_row(r["method"], "", "", "", "", r["note"])
    console.print(tab)

    sc = results.get(SCORING)
    goals = goal_lines(rows, sc)
    for line in goals:
        console.print(line)
    out = output_root / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    record = {"problem": p_desc, "rows": rows, "scoring": sc, "goals": goals, "argv": sys.argv[1:]}
    tmp_json = out / f".peers_{args.dataset}.json.tmp"
    tmp_json.write_text(json.dumps(record, indent=2))
    tmp_json.replace(out / f"peers_{args.dataset}.json")
    md = [
        f"{p_desc}.",
        "",
        "| method | seconds | peak MiB | r vs reference | r vs (H+λI)⁻¹ |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "seconds" in r:
            md.append(f"| {r['method']} | {r['seconds']:.1f} | {r['peak_mib']:.0f} | {r['r_reference']:.4f} | "
                      f"{r['r_inverse']:.4f} |")  # fmt: skip
        else:
            md.append(f"| {r['method']} | | | | {r['note']} |")
    md += ["", *[f"- {g}" for g in goals]]
    tmp_md = out / f".peers_{args.dataset}.md.tmp"
    tmp_md.write_text("\n".join(md) + "\n")
    tmp_md.replace(out / f"peers_{args.dataset}.md")
    console.print(f"saved {out / f'peers_{args.dataset}.json'} and .md")


def goal_lines(rows: list[dict], sc: dict | None) -> list[str]:
    """The benchmark's goals (docs/peer-benchmark.md), each stated with the numbers measured in this run."""
    timed = [r for r in rows if "seconds" in r and not r["method"].startswith("reference")]
    lines = []
    default = next((r for r in timed if r["method"] == "msif default"), None)
    kron = next((r for r in timed if r["method"].startswith("kronfluence ekfac")), None)
    if default:
        line = f"msif default: r = {default['r_reference']:.4f} against the reference in {default['seconds']:.1f} s"
        if kron:
            line += f"; Kronfluence EK-FAC: {kron['seconds']:.1f} s (r = {kron['r_reference']:.4f})"
        lines.append(line + ".")
    ran = [r for r in timed if not r["method"].startswith("msif")]
    peers = [r for r in ran if r["r_reference"] >= 0.9]
    if not ran:
        lines.append("no peer library ran (see the skipped rows).")
    elif peers:
        best = min(peers, key=lambda r: r["seconds"])
        lines.append(
            f"fastest peer at r >= 0.9: {best['method']}, {best['seconds']:.1f} s (r = {best['r_reference']:.4f})."
        )
    else:
        lines.append("no peer method reached r >= 0.9 against the reference.")
    if sc:
        lines.append(
            f"scoring all examples: fastest forward pass {sc['forward']:.2f} s (batch {sc.get('forward_batch')}), "
            f"msif jvp {sc['jvp']:.2f} s "
            f"({sc['jvp'] / sc['forward']:.2f}x), per-example gradients {sc['per_example']:.2f} s "
            f"({sc['per_example'] / sc['forward']:.2f}x)."
        )
        mem = ", ".join(f"m = {int(k):,}: +{v:.0f} MiB" for k, v in sc["memory_mib"].items())
        lines.append(f"peak memory while scoring from a memory-mapped file (anonymous RSS above the start): {mem}.")
    return lines


if __name__ == "__main__":
    main()
