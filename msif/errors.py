"""The one exception type users see: a paragraph saying what was wrong and how to fix it."""

from __future__ import annotations

import textwrap


class MsifError(Exception):
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
