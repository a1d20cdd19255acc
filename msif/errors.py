"""The exceptions users see: a paragraph saying what was wrong and how to fix it.

`MsifError` is a `ValueError`, so a library user can catch it like any bad-argument error. The numerical library
(msif.influence) words its advice in terms of its own settings; errors about solver settings are `SolverError`s that
name the Hessian and the settings concerned, so the `msif` command can add the command-line syntax
(`solver.pretrain.damping=...`).
"""

from __future__ import annotations

import textwrap


class MsifError(ValueError):
    """A user-facing error. The message is one paragraph: what went wrong, then what to do about it.

    The CLI prints it without a traceback and exits with status 2.
    """

    def __init__(self, what: str, fix: str | None = None):
        self.what = what.strip()
        self.fix = fix.strip() if fix else None
        super().__init__(self.message)

    @property
    def message(self) -> str:
        text = self.what if not self.fix else f"{self.what} {self.fix}"
        return textwrap.dedent(text).strip()


class SolverError(MsifError):
    """An IHVP solver's settings are invalid, or its solve failed; `keys` are the settings the advice refers to,
    for the `hessian` ("pretrain" or "finetune") they belong to."""

    def __init__(self, what: str, fix: str | None = None, *, hessian: str = "", keys: tuple[str, ...] = ()):
        self.hessian = hessian
        self.keys = tuple(keys)
        super().__init__(what, fix)


class UnconvergedSolveWarning(UserWarning):
    """An IHVP solve stopped above its tolerance (but below max_residual): its scores are less exact than asked."""
