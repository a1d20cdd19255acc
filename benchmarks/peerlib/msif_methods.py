"""msif's own single-stage solvers on the shared `Problem` (same signature and units as the peer adapters)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from peerlib.problem import Problem

# msif's default single-stage solver: the one `SingleStageInfluence` and `msif influence mode=single_stage` use
# when none is given (msif.influence.single.DEFAULT_SOLVER), at the benchmark's damping.
REFERENCE_TOL = 1e-7


def single_stage(p: Problem, solver: dict) -> np.ndarray:
    from msif.influence import SingleStageInfluence

    ssi = SingleStageInfluence(
        p.net, (p.x_train, p.y_train), solver=solver, hessian_sample=len(p.hessian_index), batch_size=p.batch_size
    )
    return ssi.influence(p.x_test, p.y_test).double().numpy()


def default(p: Problem) -> np.ndarray:
    from msif.influence.single import DEFAULT_SOLVER

    return single_stage(p, {**DEFAULT_SOLVER, "damping": p.damping})


def reference(p: Problem) -> np.ndarray:
    """The converged reference: the paper's (H² + λI) x = H b by CG to a relative residual of 1e-7."""
    return single_stage(
        p, {"method": "cg_normal", "damping": p.damping, "iterations": 1000, "tol": REFERENCE_TOL, "max_residual": 1e9}
    )


def reference_inverse(p: Problem) -> np.ndarray:
    """What the peers approximate, (H + λI)⁻¹ b, converged: CG on the normal equations of H + λI (which may be
    indefinite), ((H + λI)² + μI) x = (H + λI) b with μ = 1e-10, to a relative residual of 1e-7."""
    from msif.influence import SingleStageInfluence

    solver = {"method": "cg_normal", "damping": 1e-10, "iterations": 2000, "tol": REFERENCE_TOL, "max_residual": 1e9}
    ssi = SingleStageInfluence(
        p.net, (p.x_train, p.y_train), solver=solver, hessian_sample=len(p.hessian_index), batch_size=p.batch_size
    )
    ssi.H.shift = p.damping  # H + λI as the matrix the normal equations are formed with
    return ssi.influence(p.x_test, p.y_test).double().numpy()


def _fixed(method: str, **extra) -> Callable[[Problem], np.ndarray]:
    return lambda p: single_stage(
        p, {"method": method, "damping": p.damping, "tol": 1e-12, "max_residual": 1e9, **extra}
    )


METHODS: dict[str, Callable[[Problem], np.ndarray]] = {
    "msif default": default,
    "msif cg_normal (10 it)": _fixed("cg_normal", iterations=10),
    "msif cg_normal (20 it)": _fixed("cg_normal", iterations=20),
    "msif lanczos (10 it)": _fixed("lanczos", iterations=10),
    "msif lanczos (20 it)": _fixed("lanczos", iterations=20),
    "msif cg (50 it)": _fixed("cg", iterations=50),
    "msif lissa (depth 200)": _fixed("lissa", depth=200),
    "msif identity": _fixed("identity"),
}
REFERENCES: dict[str, Callable[[Problem], np.ndarray]] = {
    "reference": reference,
    "reference (H+λI)⁻¹": reference_inverse,
}
