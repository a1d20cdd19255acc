"""The single-stage influence problem that msif and every peer library are run on, built from an msif checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class Problem:
    """Influence of every training example on the summed loss of the test examples, for one trained network.

    net:        the trained network (eval mode, float32, CPU); net(x) -> logits; loss = cross-entropy.
    x_train, y_train: the m training examples that are scored.
    hessian_index:    rows of the training set the Hessian H (of the *mean* loss) is computed on.
    x_test, y_test:   the target T; L_T = Σ_t cross-entropy(t).
    damping:          λ in (H + λI)⁻¹ (msif's cg_normal solves (H² + λI) x = H b instead; see peers.py).
    batch_size:       a batch size for scoring loops.

    Scores returned by every method: I(z) = −∇L_Tᵀ (H+λI)⁻¹ ∇ℓ(z) (positive = harmful), shape (m,), float64.
    """

    net: nn.Module
    x_train: torch.Tensor
    y_train: torch.Tensor
    hessian_index: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    damping: float = 0.01
    batch_size: int = 256

    @property
    def m(self) -> int:
        return len(self.y_train)

    @property
    def x_hessian(self) -> torch.Tensor:
        return self.x_train[self.hessian_index]

    @property
    def y_hessian(self) -> torch.Tensor:
        return self.y_train[self.hessian_index]


def build_problem(
    dataset: str = "mnist",
    test_points: int = 500,
    hessian_sample: int = 1000,
    damping: float = 0.01,
    overrides: list[str] | None = None,
) -> Problem:
    """The benchmark problem: msif's pretrained network for `dataset` (trained first if missing), all its pretraining
    examples, the first `test_points` of its test set, and msif's own Hessian sample (same seed as msif's)."""
    from hydra import compose, initialize_config_dir

    from msif.config import CONF_DIR
    from msif.influence.api import _sample
    from msif.lifecycle import Context
    from msif.stages.pretrain import pretrained

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("influence", overrides=[f"dataset={dataset}", "mode=single_stage", *(overrides or [])])
    ctx = Context(cfg)
    pre = pretrained(cfg, ctx)
    train, test = ctx.tasks(cfg).pretrain.train, ctx.tasks(cfg).pretrain.test
    net = pre.net.float().cpu().eval()
    for p in net.parameters():
        p.requires_grad_(True)
    return Problem(
        net=net,
        x_train=train.x.float(),
        y_train=train.y.long(),
        hessian_index=_sample(len(train), hessian_sample, 0),
        x_test=test.x[:test_points].float(),
        y_test=test.y[:test_points].long(),
        damping=damping,
    )


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


FLOOR_BATCH_SIZES = (64, 128, 256, 512)


def forward_floor(net, x: torch.Tensor, y: torch.Tensor, repeats: int = 2) -> tuple[float, int]:
    """(seconds, batch size) of the fastest plain forward pass (no gradients, cross-entropy per example) over all of
    (x, y), best of `repeats` at each of FLOOR_BATCH_SIZES: the floor scoring is compared with. The forward pass's speed
    depends on the batch size (activations above glibc's 32 MiB mmap threshold are page-faulted afresh each batch),
    so a floor at one batch size can flatter whatever it is compared with."""
    import time

    import torch.nn.functional as F

    best = (float("inf"), 0)
    with torch.no_grad():
        for bs in FLOOR_BATCH_SIZES:
            for _ in range(repeats):
                start = time.perf_counter()
                for i in range(0, len(y), bs):
                    F.cross_entropy(net(x[i : i + bs]), y[i : i + bs], reduction="none")
                best = min(best, (time.perf_counter() - start, bs))
    return best
