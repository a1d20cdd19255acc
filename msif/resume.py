"""The saved parts of an unfinished influence run (its `partial/` folder): solved target blocks and score parts, each
written as it is finished, so that a rerun resumes instead of starting over. Under torchrun process 0 writes them."""

from __future__ import annotations

from pathlib import Path

import torch

from msif import distributed
from msif.influence.solvers import SolveReport
from msif.io import atomic_torch_save


def solve_targets(msi, x_T: torch.Tensor, y_T: torch.Tensor, per_test: bool, chunk: int, partial: Path) -> torch.Tensor:
    """The solved vectors s (K, p) for the targets, in blocks of `chunk` test points (per-test) or one (summed).
    Each block is saved in `partial/` with its timings and solver reports as it is solved."""
    chunk = chunk if per_test else len(y_T)
    blocks = []
    for j, i in enumerate(range(0, len(y_T), chunk)):
        file = partial / f"targets-{j:05d}.pt"
        if distributed.broadcast_from_main(file.exists()):  # every process takes the same branch
            saved = torch.load(file, map_location="cpu", weights_only=True)
            for step, sec in saved["seconds"].items():
                msi.trace.seconds[step] = msi.trace.seconds.get(step, 0.0) + sec
            msi.trace.solves.extend(SolveReport(**r) for r in saved["solves"])
            blocks.append(saved["S"].to(msi.device))
            continue
        before, solves0 = dict(msi.trace.seconds), len(msi.trace.solves)
        S = msi.target_vectors(x_T[i : i + chunk], y_T[i : i + chunk], per_test=per_test)
        seconds = {k: v - before.get(k, 0.0) for k, v in msi.trace.seconds.items()}
        solves = [dict(r.__dict__) for r in msi.trace.solves[solves0:]]
        if distributed.is_main():
            atomic_torch_save({"S": S.detach().cpu(), "seconds": seconds, "solves": solves}, file)
        blocks.append(S)
    return torch.cat(blocks)


def score_in_parts(msi, S: torch.Tensor, rows: torch.Tensor, part_rows: int, partial: Path) -> torch.Tensor | None:
    """Scores (len(rows), K), computed `part_rows` pretraining examples at a time; each part is saved in `partial/`
    when done (a rerun skips the finished parts), so an interruption loses at most one part of work. Under torchrun
    process r scores parts r, r + N, ...; process 0 gathers them and returns the whole (the others return None)."""
    starts = list(range(0, len(rows), part_rows))
    mine = {}
    for j in distributed.shard(list(range(len(starts)))):
        i, file = starts[j], partial / f"scores-{j:05d}.pt"
        if file.exists():
            mine[j] = torch.load(file, map_location="cpu", weights_only=True)["scores"]
            continue
        part = msi.score(S, rows[i : i + part_rows])
        atomic_torch_save({"scores": part, "rows": rows[i : i + part_rows].clone()}, file)
        mine[j] = part
    gathered = distributed.gather_to_main(mine)
    if gathered is None:
        return None
    parts = {j: t for d in gathered for j, t in d.items()}
    return torch.cat([parts[j] for j in range(len(starts))])
