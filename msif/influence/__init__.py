"""Multi-stage influence (MATH.md): the steps (multistage.py), Hessians (hessian.py), IHVP solvers (solvers.py),
scoring (scoring.py) and the Python API (api.py)."""

import warnings

# torch.func's forward-mode decompositions call the deprecated torch.jit.script internally (torch 2.14).
warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated", category=FutureWarning)

from msif.influence.api import MultiStageInfluence, default_solver  # noqa: E402
from msif.influence.single import SingleStageInfluence  # noqa: E402
from msif.influence.solvers import METHODS  # noqa: E402

__all__ = ["METHODS", "MultiStageInfluence", "SingleStageInfluence", "default_solver"]
