"""Composing stage configs in this process, and where the shared real data sets live."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

import msif  # noqa: F401  (registers resolvers)
from msif.config import CONF_DIR

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def compose_cfg(stage: str, overrides: list[str] | None = None, config_dir: Path | None = None):
    """The config `msif <stage> <overrides>` would run with (environment variables resolved at access); with
    `config_dir`, as MSIF_CONFIG_DIR=<config_dir> would."""
    overrides = list(overrides or [])
    if config_dir is not None:
        overrides.append(f"hydra.searchpath=[file://{Path(config_dir).resolve()}]")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=stage.replace("-", "_"), overrides=overrides, return_hydra_config=False)
