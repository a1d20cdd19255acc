"""Numerical helpers of the influence tests."""

from __future__ import annotations

import torch
from torch.func import hessian


def minimize(objective, x0: torch.Tensor) -> torch.Tensor:
    """L-BFGS, then Newton steps with the explicit Hessian: stationary to machine precision (float64)."""
    x = x0.clone().requires_grad_()
    opt = torch.optim.LBFGS(
        [x],
        lr=1,
        max_iter=500,
        tolerance_grad=1e-12,
        tolerance_change=1e-16,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = objective(x)
        loss.backward()
        return loss

    opt.step(closure)
    x = x.detach()
    for _ in range(4):
        g = torch.func.grad(objective)(x)
        x = x - torch.linalg.solve(hessian(objective)(x), g)
    return x
