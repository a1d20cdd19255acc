"""Typed settings of the IHVP solvers (msif.influence.solvers): one frozen dataclass per method, validated once.

`solver_settings(spec)` turns a mapping such as `{"method": "lanczos", "damping": 0.01}` (a config node, a dict) into
the dataclass of its method, refusing unknown keys, wrong types and out-of-range values with a `SolverError` that
names the setting. Defaults are those of the shipped solver configs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from msif.errors import SolverError


@dataclass(frozen=True)
class SolverSettings:
    """What every solver has: the damping λ, the tolerance below which a residual counts as converged, and the
    residual above which the solve is an error rather than a ranking.

    `relative_damping` ρ, when set, replaces `damping` by one relative to the Hessian's spectrum: eigenvalues of H
    smaller in magnitude than ρ·|λ|_max are damped, i.e. λ = ρ·|λ|_max for (H + λI) x = b and λ = (ρ·|λ|_max)² for
    the paper's (H² + λI) x = H b, with |λ|_max from a short seeded Lanczos run (msif.influence.solvers). An absolute
    λ means something else for every model, data set and training length; a relative one does not."""

    method: ClassVar[str] = ""
    damping: float = 0.0
    relative_damping: float | None = None
    tol: float = 1e-6
    max_residual: float = 1.0
    hessian: str = ""  # which Hessian these settings are for ("pretrain", "finetune"); only names it in messages

    def __post_init__(self) -> None:
        self._at_least("damping", 0.0)
        if self.relative_damping is not None:
            self._positive("relative_damping")
        self._at_least("tol", 0.0)  # 0: run every iteration
        self._positive("max_residual")

    def as_dict(self) -> dict[str, Any]:
        """The settings as a plain mapping (with `method`), as a config would give them."""
        return {"method": self.method, **{k: v for k, v in asdict(self).items() if k != "hessian"}}

    def _bad(self, key: str, what: str) -> SolverError:
        where = f" for the {self.hessian} Hessian" if self.hessian else ""
        return SolverError(
            f"The {self.method} solver's setting {key}={getattr(self, key)!r}{where} is invalid: {what}.",
            f"Set {key} to {what}.",
            hessian=self.hessian,
            keys=(key,),
        )

    def _at_least(self, key: str, low: float) -> None:
        v = getattr(self, key)
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= low):
            raise self._bad(key, f"a finite number >= {low:g}")

    def _positive(self, key: str) -> None:
        v = getattr(self, key)
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
            raise self._bad(key, "a finite number > 0")

    def _count(self, key: str, low: int = 1) -> None:
        v = getattr(self, key)
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= low):
            raise self._bad(key, f"an integer >= {low}")

    def _flag(self, key: str) -> None:
        if not isinstance(getattr(self, key), bool):
            raise self._bad(key, "true or false")

    def _check_retrain(self) -> None:
        """`retrain_lr` η and `retrain_steps` K come together: both set (the retrain response) or both unset."""
        lr, steps = getattr(self, "retrain_lr", None), getattr(self, "retrain_steps", None)
        if (lr is None) != (steps is None):
            missing = "retrain_steps" if steps is None else "retrain_lr"
            raise self._bad(missing, "set as well (retrain_lr and retrain_steps go together), or both left unset")
        if lr is not None:
            self._positive("retrain_lr")
            self._count("retrain_steps")

    @property
    def retrain(self) -> tuple[float, int] | None:
        """(η, K) when each inverse is replaced by the response of K gradient steps at rate η, else None."""
        lr, steps = getattr(self, "retrain_lr", None), getattr(self, "retrain_steps", None)
        return None if lr is None else (float(lr), int(steps))


@dataclass(frozen=True)
class LanczosSettings(SolverSettings):
    """Lanczos on H from each b: at most `iterations` steps (one HVP each), stopping when the answer changes by less
    than `tol` (relative). `normal`: the paper's (H² + λI) x = H b; else (H + λI) x = b (MINRES).

    `retrain_lr` η and `retrain_steps` K, when set, replace the inverse by the linear response of K gradient-descent
    steps at rate η from the trained point, x = (I − (I − ηH)^K) H⁻¹ b (docs/MATH.md, "The retrain response"); the
    damping is then unused."""

    method: ClassVar[str] = "lanczos"
    iterations: int = 100
    normal: bool = True
    retrain_lr: float | None = None
    retrain_steps: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._count("iterations")
        self._flag("normal")
        self._check_retrain()


@dataclass(frozen=True)
class CGSettings(SolverSettings):
    """Conjugate gradients on (H + λI) x = b, at most `iterations` iterations (one HVP each)."""

    method: ClassVar[str] = "cg"
    iterations: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        self._count("iterations")


@dataclass(frozen=True)
class CGNormalSettings(CGSettings):
    """The paper's solver: CG on (H² + λI) x = H b, two HVPs per iteration."""

    method: ClassVar[str] = "cg_normal"


@dataclass(frozen=True)
class LowrankSettings(SolverSettings):
    """`rank` Ritz pairs of H fitted once from a random start (`seed`) and cached; the filter applied on their span,
    or, with `block` > 0, on their span and `steps` Krylov blocks of the targets' own remainder (`block` principal
    directions of what the pairs miss; block × steps HVPs shared by every target of the solve)."""

    method: ClassVar[str] = "lowrank"
    rank: int = 100
    seed: int = 0
    normal: bool = True
    block: int = 32
    steps: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        self._count("rank")
        self._count("seed", 0)
        self._flag("normal")
        self._count("block", 0)
        self._count("steps")


@dataclass(frozen=True)
class LissaSettings(SolverSettings):
    """The truncated Neumann series: `depth` terms, averaged over `repeats` runs, H scaled by `scale` ("auto": 1.1 ×
    a power-iteration estimate of the largest eigenvalue of H + λI)."""

    method: ClassVar[str] = "lissa"
    scale: float | str = "auto"
    depth: int = 1000
    repeats: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        self._count("depth")
        self._count("repeats")
        if self.scale is None:
            object.__setattr__(self, "scale", "auto")
        if self.scale != "auto":
            self._positive("scale")


@dataclass(frozen=True)
class ExactSettings(SolverSettings):
    """The explicit matrix and a dense solve (small models only: at most `max_params` parameters). `normal`: the
    paper's (H² + λI) x = H b; else (H + λI) x = b."""

    method: ClassVar[str] = "exact"
    normal: bool = True
    max_params: int = 10_000
    retrain_lr: float | None = None  # with retrain_steps: the retrain response, as for lanczos
    retrain_steps: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._flag("normal")
        self._count("max_params")
        self._check_retrain()


@dataclass(frozen=True)
class IdentitySettings(SolverSettings):
    """H⁻¹ replaced by the identity (the paper's Figure 3 ablation)."""

    method: ClassVar[str] = "identity"


SETTINGS: dict[str, type[SolverSettings]] = {
    cls.method: cls
    for cls in (
        CGNormalSettings,
        LanczosSettings,
        LowrankSettings,
        CGSettings,
        LissaSettings,
        ExactSettings,
        IdentitySettings,
    )
}
METHODS = tuple(SETTINGS)


def solver_settings(spec: SolverSettings | Mapping[str, Any], hessian: str = "") -> SolverSettings:
    """The typed settings for `spec`: a `SolverSettings` (returned as it is) or a mapping with a `method` key."""
    if isinstance(spec, SolverSettings):
        return spec
    if not isinstance(spec, Mapping):
        raise SolverError(
            f"Solver settings must be a mapping with a 'method' key or a SolverSettings, not a {type(spec).__name__}.",
            "Pass e.g. {'method': 'lanczos', 'damping': 0.01} or LanczosSettings(damping=0.01).",
            hessian=hessian,
        )
    spec = dict(spec)
    method = spec.pop("method", None)
    where = f" for the {hessian} Hessian" if hessian else ""
    if method not in SETTINGS:
        raise SolverError(
            f"Unknown IHVP solver '{method}'{where}.",
            f"Use one of {list(METHODS)}.",
            hessian=hessian,
            keys=("method",),
        )
    cls = SETTINGS[method]
    names = [f.name for f in fields(cls) if f.name != "hessian"]
    unknown = sorted(set(spec) - set(names))
    if unknown:
        raise SolverError(
            f"The {method} solver{where} has no setting '{unknown[0]}'.",
            f"Its settings are {names}.",
            hessian=hessian,
            keys=(unknown[0],),
        )
    for f in fields(cls):  # numbers given as int where a float is meant (damping=0) are fine
        if f.name in spec and f.type in ("float", float, "float | None") and isinstance(spec[f.name], int):
            if not isinstance(spec[f.name], bool):
                spec[f.name] = float(spec[f.name])
    return cls(**spec, hessian=hessian)
