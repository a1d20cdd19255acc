"""Shared test helpers: compose configs in-process, run the `msif` command in a subprocess, all inside tmp_path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import msif  # noqa: F401  (registers resolvers)
from msif.cli import CONF_DIR

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def env(tmp_path, monkeypatch) -> dict[str, str]:
    """Environment for a subprocess run: outputs, cache and an (empty) data folder inside tmp_path."""
    e = dict(os.environ)
    e.update(
        {
            "MSIF_OUTPUTS": str(tmp_path / "outputs"),
            "MSIF_CACHE": str(tmp_path / "cache"),
            "MSIF_DATA": str(tmp_path / "data"),
            "COLUMNS": "200",
        }
    )
    for k in ("MSIF_OUTPUTS", "MSIF_CACHE", "MSIF_DATA"):
        monkeypatch.setenv(k, e[k])
    return e


def compose_cfg(stage: str, overrides: list[str] | None = None):
    """The config `msif <stage> <overrides>` would run with (environment variables resolved at access)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=stage.replace("-", "_"), overrides=list(overrides or []), return_hydra_config=False)


def run_msif(args: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "msif", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600
    )
