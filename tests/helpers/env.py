"""Each test's own outputs, cache and (empty) data folder inside tmp_path, set in the environment msif reads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

COLUMNS = "200"  # the terminal width a run is told (argparse / Hydra help text); msif's consoles use 120 off a tty


def folders_in(tmp_path: Path) -> dict[str, str]:
    return {
        "MSIF_OUTPUTS": str(tmp_path / "outputs"),
        "MSIF_CACHE": str(tmp_path / "cache"),
        "MSIF_DATA": str(tmp_path / "data"),
    }


def isolate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point MSIF_OUTPUTS / MSIF_CACHE / MSIF_DATA inside tmp_path (undone after the test) and return the whole
    environment as a dict, with COLUMNS=200: what a subprocess of this test gets (tests/helpers/cli.py's in-process
    runs set COLUMNS the same way for their duration)."""
    for k, v in folders_in(tmp_path).items():
        monkeypatch.setenv(k, v)
    return {**os.environ, "COLUMNS": COLUMNS}
