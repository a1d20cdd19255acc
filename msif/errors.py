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


def disk_error(err: OSError, doing: str = "write") -> MsifError:
    """An OSError from the file system, as the paragraph a user can act on (a full disk, a read-only folder)."""
    import errno

    where = f" {err.filename}" if err.filename else ""
    what = f"msif could not {doing}{where}: {err.strerror or err}."
    kept = "Files already on disk are complete and unchanged (every write is a temporary file renamed into place)"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f"The disk is full. {kept}; free some space (or choose another output_root=...) and rerun the command."
    elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = (
            f"{kept}. Results go under output_root (env MSIF_OUTPUTS): point it at a folder you can write, e.g. "
            "output_root=$HOME/msif-outputs. A finished run in a read-only folder can still be read: rerun with "
            "exactly its settings."
        )
    else:
        fix = f"{kept}; fix the file system problem and rerun the same command."
    return MsifError(what, fix)
