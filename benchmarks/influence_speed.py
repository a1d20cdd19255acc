"""Benchmark: scoring every pretraining example with msif vs a naive per-example gradient loop vs a forward pass.

    python benchmarks/influence_speed.py                      # MNIST (Table A network), case fixed, profile cpu
    python benchmarks/influence_speed.py dataset=digits       # any `msif influence` override works

All three are timed in this one run on the same trained checkpoint (made first if missing) and the same solved
vector s, and printed as ratios to the forward pass, so machine noise cancels as far as it can:

* msif scoring: one forward-mode directional derivative per batch (msif/influence/scoring.py);
* naive loop: `torch.autograd.grad` of each example's loss, dotted with s (how most published ports do it);
* forward floor: a plain forward pass over the same examples, no gradients, at the fastest of batch sizes 64-512
  (peerlib.problem.forward_floor: this machine runs it up to 1.7x slower at 512 rows than at 128).

The whole `msif influence` computation (gradients, both IHVPs, mixed term, scoring) is timed as well.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from peerlib.problem import forward_floor

import msif  # noqa: F401
from msif.config import CONF_DIR
from msif.console import console, table
from msif.io import atomic_write_json
from msif.lifecycle import Context
from msif.stages.finetune import finetuned
from msif.stages.influence import Upstream, build_influence


def main(overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("influence", overrides=["dataset=mnist", "case=fixed", *overrides])
    ctx = Context(cfg)
    pre, fin = finetuned(cfg, ctx)
    tasks = ctx.tasks(cfg)
    pre_set, test = tasks.pretrain.train, tasks.finetune.test
    torch.set_grad_enabled(True)

    t0 = time.perf_counter()
    msi = build_influence(cfg, Upstream(pre, fin), ctx)
    S = msi.target_vectors(test.x, test.y)
    t_solve = time.perf_counter() - t0
    t1 = time.perf_counter()
    ours = msi.score(S)[:, 0]
    t_score = time.perf_counter() - t1
    t_total = time.perf_counter() - t0
    t1 = time.perf_counter()
    msi.score(S)
    t_score = min(t_score, time.perf_counter() - t1)  # best of two, like the floor

    net = copy.deepcopy(msi.pretrain_net)  # msif's own copy holds its parameters without gradients
    params = [p.requires_grad_(True) for _, p in net.named_parameters()]
    s_parts = list(msi.pre_space.unflatten(S[0]).values())
    x, y = pre_set.x.to(ctx.device), pre_set.y.to(ctx.device)

    t2 = time.perf_counter()
    naive = torch.empty(len(y), dtype=S.dtype)
    for i in range(len(y)):
        loss = F.cross_entropy(net(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, params)
        naive[i] = -sum((g * s).sum() for g, s in zip(grads, s_parts, strict=True))
    t_naive = time.perf_counter() - t2

    t_forward, floor_batch = forward_floor(net, x, y)

    agree = float((ours - naive).abs().max() / naive.abs().max())
    rows = [
        [f"forward pass only (the floor: fastest batch size, {floor_batch})", t_forward, 1.0],
        ["msif scoring (forward-mode, batched)", t_score, t_score / t_forward],
        ["naive per-example autograd.grad loop", t_naive, t_naive / t_forward],
        ["msif influence, whole (grads, 2 IHVPs, mixed term, scoring)", t_total, t_total / t_forward],
    ]
    console.print(
        table(
            f"scoring all m={len(y):,} pretraining examples of {cfg.dataset.name} (case {cfg.case.name}, "
            f"solver {cfg.solver.pretrain.method}, {torch.get_num_threads()} threads, {ctx.device})",
            ["computation", "seconds", "× forward pass"],
            rows,
        )
    )
    console.print(
        f"naive loop / msif scoring = {t_naive / t_score:.1f}×; the two score vectors agree to "
        f"{agree:.1e} (max abs difference / max |score|); solve steps: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in msi.trace.seconds.items())
    )
    out = Path(cfg.output_root) / "benchmarks" / f"influence_speed_{cfg.dataset.name}_{cfg.case.name}.json"
    atomic_write_json(
        {
            "m": len(y),
            "seconds": {
                "forward": t_forward,
                "forward_batch": floor_batch,
                "msif_scoring": t_score,
                "naive_loop": t_naive,
                "msif_total": t_total,
                "solve": t_solve,
            },
            "steps": msi.trace.seconds,
            "agreement": agree,
            "threads": torch.get_num_threads(),
            "device": str(ctx.device),
            "overrides": overrides,
        },
        out,
    )
    console.print(f"saved {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
