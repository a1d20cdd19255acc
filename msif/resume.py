"""The saved parts of an unfinished influence run (its `partial/` folder): solved target blocks and score parts, each
written as it is finished, so that a rerun resumes instead of starting over. Under torchrun process 0 writes them.

Every part records what it holds: a target block its test rows, a score part its pretraining rows and a fingerprint
of the solved vectors it was scored against. A part is reused only when that matches what the rerun needs (another
`target.chunk` or `score.part_rows`, other targets, a truncated or unreadable file: it is computed again), so a
resumed table is always the table an uninterrupted run makes.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch

from msif import distributed
from msif.console import say
from msif.errors import UnconvergedSolveWarning
from msif.influence.solvers import SolveReport
from msif.io import atomic_torch_save, atomic_write_json
from msif.runs import read_json


def solve_targets(
    msi, x_T: torch.Tensor, y_T: torch.Tensor, rows: torch.Tensor, per_test: bool, chunk: int, partial: Path
) -> torch.Tensor:
    """The solved vectors s (K, p) for the targets (test rows `rows`), in blocks of `chunk` test points (per-test)
    or one (summed). Each block is saved in `partial/` with its rows, timings and solver reports as it is solved."""
    chunk = chunk if per_test else len(y_T)
    blocks, reused = [], 0
    for i in range(0, len(y_T), chunk):
        block_rows = rows[i : i + chunk].clone()
        file = partial / f"targets-{i:06d}-{len(block_rows):05d}.pt"
        saved = _saved(file, {"rows": block_rows}, ("S", (len(block_rows) if per_test else 1,)))
        if saved is not None:
            for step, sec in saved["seconds"].items():  # the earlier run's time, kept apart from this run's
                msi.trace.reused_seconds[step] = msi.trace.reused_seconds.get(step, 0.0) + sec
            reports = [SolveReport(**r) for r in saved["solves"]]
            for r in reports:
                if not r.converged and r.method != "identity":  # said when it was solved; said again now
                    warnings.warn(
                        f"the reused {r.label} Hessian IHVP ({r.method}, {r.iterations} iterations) stopped at "
                        f"relative residual {r.residual:.3g}; ‖Hx − b‖/‖b‖ = {r.inverse_residual:.3g}.",
                        UnconvergedSolveWarning,
                        stacklevel=2,
                    )
            msi.trace.solves.extend(reports)
            blocks.append(saved["S"].to(msi.device))
            reused += 1
            continue
        before, solves0 = dict(msi.trace.seconds), len(msi.trace.solves)
        S = msi.target_vectors(x_T[i : i + chunk], y_T[i : i + chunk], per_test=per_test)
        seconds = {k: v - before.get(k, 0.0) for k, v in msi.trace.seconds.items()}
        solves = [dict(r.__dict__) for r in msi.trace.solves[solves0:]]
        if distributed.is_main():
            atomic_torch_save({"S": S.detach().cpu(), "rows": block_rows, "seconds": seconds, "solves": solves}, file)
        blocks.append(S)
    if reused:
        say(f"influence: reused {reused} solved target block(s) from {partial} (an earlier run of these settings)")
    return torch.cat(blocks)


def score_in_parts(msi, S: torch.Tensor, rows: torch.Tensor, part_rows: int, partial: Path) -> torch.Tensor | None:
    """Scores (len(rows), K), computed `part_rows` pretraining examples at a time; each part is saved in `partial/`
    when done (a rerun skips the finished parts), so an interruption loses at most one part of work. Under torchrun
    process r scores parts r, r + N, ...; process 0 gathers them and returns the whole (the others return None)."""
    starts = list(range(0, len(rows), part_rows))
    targets = fingerprint(S)
    mine, reused = {}, 0
    method_file = partial / "score_method.json"
    if msi.score_method == "auto":  # the method an earlier run measured, so every part is scored the same way
        earlier = read_json(method_file).get("method")
        if earlier in ("jvp", "per_example"):
            msi.score_method = earlier
    for j in distributed.shard(list(range(len(starts)))):
        i = starts[j]
        part = rows[i : i + part_rows].clone()
        file = partial / f"scores-{i:08d}-{len(part):06d}.pt"
        expect = {"rows": part, "targets": targets}
        saved = _saved(file, expect, ("scores", (len(part), len(S))), shared=False)
        if saved is not None:
            mine[j] = saved["scores"]
            reused += 1
            continue
        scores = msi.score(S, part)
        if msi.score_method == "auto" and msi.trace.scoring.get("method") in ("jvp", "per_example"):
            # measured once, on this first part; the later parts (and a resumed run) keep it: the two ways agree
            # only to rounding, and one table should not mix them
            msi.score_method = msi.trace.scoring["method"]
            if distributed.is_main():
                atomic_write_json({"method": msi.score_method}, method_file)
        atomic_torch_save({"scores": scores, "rows": part, "targets": targets}, file)
        mine[j] = scores
    if reused:
        say(f"influence: reused {reused} finished score part(s) from {partial}")
    gathered = distributed.gather_to_main(mine)
    if gathered is None:
        return None
    parts = {j: t for d in gathered for j, t in d.items()}
    return torch.cat([parts[j] for j in range(len(starts))])


def fingerprint(S: torch.Tensor) -> str:
    """A hash of the solved vectors, so a score part is only reused against the very targets it was scored for."""
    data = S.detach().cpu().contiguous()
    return hashlib.sha256(data.view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:32]


def _saved(file: Path, expect: dict, shape: tuple[str, tuple[int, ...]], shared: bool = True) -> dict | None:
    """The part in `file` when it exists, loads (weights_only), holds `expect` and its tensor `shape[0]` starts with
    the dimensions `shape[1]`; else None. `shared`: every process reads this file (process 0 decides for all)."""

    def check() -> dict | None:
        if not file.exists():
            return None
        try:
            saved = torch.load(file, map_location="cpu", weights_only=True)
            key, dims = shape
            same = all(_equal(saved.get(k), v) for k, v in expect.items())
            same = same and tuple(saved[key].shape[: len(dims)]) == dims
        except Exception:  # noqa: BLE001  (an unreadable or malformed part is recomputed, never trusted)
            saved, same = None, False
        if not same:
            say(f"[yellow]note:[/] {file.name} in {file.parent} does not hold what this run needs; recomputing it")
            return None
        return saved

    if not shared:
        return check()
    saved = check() if distributed.is_main() else None
    if not distributed.broadcast_from_main(saved is not None):
        return None
    return saved if distributed.is_main() else torch.load(file, map_location="cpu", weights_only=True)


def _equal(a, b) -> bool:
    if isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu()))
    return a == b
