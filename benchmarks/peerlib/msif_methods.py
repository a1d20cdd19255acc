"""msif's own single-stage solvers on the shared `Problem` (same signature and units as the peer adapters)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from peerlib.problem import Problem

REFERENCE_TOL = 1e-7


def single_stage(p: Problem, solver: dict) -> np.ndarray:
    from msif.influence import SingleStageInfluence

    ssi = SingleStageInfluence(
        p.net, (p.x_train, p.y_train), solver=solver, hessian_sample=len(p.hessian_index), batch_size=p.batch_size
    )
    return ssi.influence(p.x_test, p.y_test).double().numpy()


def default(p: Problem) -> np.ndarray:
    """msif's default single-stage solver (msif.influence.single.DEFAULT_SOLVER: lanczos, tol 1e-6), damping λ."""
    from msif.influence.single import DEFAULT_SOLVER

    return single_stage(p, {**DEFAULT_SOLVER, "damping": p.damping})


def reference(p: Problem) -> np.ndarray:
    """The converged reference: the paper's (H² + λI) x = H b by CG to a relative residual of 1e-7."""
    return single_stage(
        p, {"method": "cg_normal", "damping": p.damping, "iterations": 1000, "tol": REFERENCE_TOL, "max_residual": 1e9}
    )


def reference_inverse(p: Problem) -> np.ndarray:
    """What the peers approximate, (H + λI)⁻¹ b, converged: MINRES (msif's lanczos with normal: false), which is fine
    for an indefinite H + λI, until the answer changes by less than 1e-7 (at most 150 steps)."""
    return single_stage(
        p,
        {
            "method": "lanczos",
            "normal": False,
            "damping": p.damping,
            "iterations": 150,
            "tol": REFERENCE_TOL,
            "max_residual": 1e9,
        },  # fmt: skip
    )


def _fixed(method: str, **extra) -> Callable[[Problem], np.ndarray]:
    return lambda p: single_stage(
        p, {"method": method, "damping": p.damping, "tol": 1e-12, "max_residual": 1e9, **extra}
    )


METHODS: dict[str, Callable[[Problem], np.ndarray]] = {
    "msif default": default,
    "msif lanczos (10 steps)": _fixed("lanczos", iterations=10),
    "msif lanczos (20 steps)": _fixed("lanczos", iterations=20),
    "msif cg_normal (10 it)": _fixed("cg_normal", iterations=10),
    "msif cg_normal (20 it)": _fixed("cg_normal", iterations=20),
    "msif lowrank (rank 100)": _fixed("lowrank", rank=100),
    "msif cg (50 it)": _fixed("cg", iterations=50),
    "msif lissa (depth 200)": _fixed("lissa", depth=200),
    "msif identity": _fixed("identity"),
}
REFERENCES: dict[str, Callable[[Problem], np.ndarray]] = {
    "reference": reference,
    "reference (H+λI)⁻¹": reference_inverse,
}
