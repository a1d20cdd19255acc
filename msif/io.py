"""Files on disk: atomic writes (temporary file, then rename) and safe loading (`weights_only=True`)."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; results should be as readable as any other file
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: Path) -> None:
    """`torch.save` to a temporary file in the same folder, then rename over `path`.

    Serialised in memory first: torch's zip writer turns a failed write (a full disk) into an opaque RuntimeError,
    while a plain write raises the OSError that says what happened."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _atomic_write(path, lambda fh: fh.write(buffer.getbuffer()))


def atomic_write_text(text: str, path: Path) -> None:
    _atomic_write(path, lambda fh: fh.write(text.encode()))


def atomic_write_bytes(data: bytes, path: Path) -> None:
    _atomic_write(path, lambda fh: fh.write(data))


def atomic_write_json(obj: Any, path: Path) -> None:
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", path)


def update_with_file(h: Any, path: Path) -> None:
    """Feed a file's bytes to the hash `h` (hashlib), in 1 MiB blocks."""
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)


def load_tensors(path: Path) -> Any | None:
    """Load a cache file with `weights_only=True`; None when it is unreadable (a cache can always be rebuilt)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001
        return None


def append_csv_row(csv: Path, columns: list[str], row: dict) -> None:
    """Append one row to a CSV table and flush it to disk (resumable tables: a row is either there or not)."""
    import pandas as pd

    line = pd.DataFrame([row], columns=columns).to_csv(index=False, header=False)
    with open(csv, "a") as fh:
        size = fh.tell()
        try:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        except BaseException:  # a full disk or an interrupt mid-row: leave the table as it was before this row
            fh.truncate(size)
            raise


KEEP = (
    "The file is kept as it is: move it away (or delete it) to start these retrains over, or restore it, then rerun "
    "the same command."
)


def read_resumable_csv(csv: Path, columns: list[str]):
    """A table written by `append_csv_row`, checked to be readable and to have `columns`. A last line cut off in the
    middle (an append interrupted by a crash or a full disk) is dropped from the file, so its row is computed again;
    a file that is otherwise not such a table is refused (MsifError) and left as it is."""
    import pandas as pd

    from msif.errors import MsifError

    try:
        text = csv.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise MsifError(f"{csv} is not a text CSV table (it holds bytes that are not UTF-8).", KEEP) from None
    if text and not text.endswith("\n"):
        # the last row's append was cut off (a crash mid-write): drop that row, which is then computed again
        complete = text[: text.rfind("\n") + 1]
        if not complete:
            raise MsifError(f"{csv} has no complete line, not even its header.", KEEP)
        atomic_write_text(complete, csv)
        text = complete
    try:
        frame = pd.read_csv(io.StringIO(text))
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise MsifError(f"{csv} is not a readable CSV table ({str(err).splitlines()[0]}).", KEEP) from None
    if list(frame.columns) != columns:
        raise MsifError(f"{csv} has the columns {list(frame.columns)}, not the {columns} this run writes.", KEEP)
    return frame
