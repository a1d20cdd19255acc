"""Multi-stage influence (docs/MATH.md): the steps (multistage.py), Hessians (hessian.py), IHVP solvers (solvers.py)
and their typed settings (settings.py), scoring (scoring.py) and the Python API (api.py, single.py).

This package is the numerical library: it imports torch and nothing of the command line (no Hydra, no rich). It
reports through `logging` (logger "msif") and `warnings` (`msif.errors.UnconvergedSolveWarning`), shows progress only
where a progress factory is installed (msif.progress), and raises `msif.errors.MsifError` (a ValueError).
"""

import warnings

# torch.func's forward-mode decompositions call the deprecated torch.jit.script internally (torch 2.14).
warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated", category=FutureWarning)

from msif.influence.api import MultiStageInfluence, default_solver  # noqa: E402
from msif.influence.settings import (  # noqa: E402
    METHODS,
    CGNormalSettings,
    CGSettings,
    ExactSettings,
    IdentitySettings,
    LanczosSettings,
    LissaSettings,
    LowrankSettings,
    SolverSettings,
    solver_settings,
)
from msif.influence.single import SingleStageInfluence  # noqa: E402

__all__ = [
    "METHODS",
    "CGNormalSettings",
    "CGSettings",
    "ExactSettings",
    "IdentitySettings",
    "LanczosSettings",
    "LissaSettings",
    "LowrankSettings",
    "MultiStageInfluence",
    "SingleStageInfluence",
    "SolverSettings",
    "default_solver",
    "solver_settings",
]
