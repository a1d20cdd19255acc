"""One process at a time per run folder: a lock file claimed atomically before a stage computes into the folder.

Two identical commands started together would otherwise both train (or both append every leave-one-out row, doubling
the table). `claimed(folder)` creates `<folder>/.lock` with O_CREAT | O_EXCL, holding the owner's PID, host and start
time, and removes it when the stage ends, however it ends. A second claim is refused with the owner named; a lock
whose PID no longer runs on this host (a killed command) is stale and taken over. Holding the lock, the claimer
removes the temporary files a killed writer left behind.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from msif.errors import MsifError

LOCK = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def _owner(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _stale(owner: dict | None) -> bool:
    """A lock whose owner is gone: unreadable (a claim cut off mid-write), or a PID on this host that has ended."""
    if owner is None or not isinstance(owner.get("pid"), int):
        return True
    return owner.get("host") == socket.gethostname() and not _alive(owner["pid"])


@contextmanager
def claimed(folder: Path, what: str) -> Iterator[None]:
    """Hold `folder`'s lock while the body runs; `what` names the stage in the refusal."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):  # a second try after taking over a stale lock
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _owner(path)
            if _stale(owner):
                path.unlink(missing_ok=True)
                continue
            raise MsifError(
                f"The {what} run folder {folder} is in use by PID {owner['pid']} on {owner.get('host')} (since "
                f"{owner.get('since')}): another msif command is computing the same result.",
                f"Wait for it to finish and rerun (the finished result is then reused), or, if that process is "
                f"gone, delete {path}.",
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise MsifError(f"Could not claim {path}: it reappeared while a stale lock was being removed.", "Rerun.")
    _remove_stale_temporaries(folder)
    try:
        yield
    finally:
        if _owner(path) == me:
            path.unlink(missing_ok=True)


def _remove_stale_temporaries(folder: Path) -> None:
    """The hidden temporary files (msif.io's `.<name>.<random>.tmp`) a killed writer left in `folder` and its
    `partial/`: with the lock held nobody else writes there, so none of them is in use."""
    for where in (folder, folder / "partial"):
        for tmp in where.glob(".*.tmp") if where.is_dir() else ():
            tmp.unlink(missing_ok=True)
