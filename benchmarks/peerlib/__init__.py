"""Adapters that run other influence libraries on the single-stage problem every library shares.

`problem.Problem` is the common input; each `<library>_methods.py` exposes `METHODS`, a dict from a method label to a
function `Problem -> np.ndarray (m,)` returning scores in msif's sign and units (docs/MATH.md):
I(z) = −∇L_Tᵀ (H+λI)⁻¹ ∇ℓ(z), L_T the summed test loss, H the Hessian of the mean training loss on the Hessian
sample. The libraries are an optional extra (`pip install .[bench]`), best installed in their own virtual
environment (`make bench-venv`).
"""
