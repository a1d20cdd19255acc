"""Finished runs made once per session and copied into a test's output root, so tests that need the same trained
tiny/digits models do not each train them again.

Run folders are named by the settings that determine them (msif/runs.py), and nothing in a folder depends on the
output root it was made under, so a copy is what the test would have made itself: a stage asked for these settings
finds the folder and reuses it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers.configs import compose_cfg
from tests.helpers.env import folders_in

STAGE_FOLDERS = {"pretrain": "finetune-", "finetune": "influence-"}  # what lies below a stage's own folder


class RunCache:
    """`outputs(stage, overrides, config)`: an output root holding the finished `stage` run (and its upstream runs)
    for `overrides`, made the first time it is asked for (in-process, with the stage function) and kept for the
    session. `config` is the stage whose primary config is composed (default `stage`): e.g. the influence run that
    `msif validate-loo <overrides>` starts from is `outputs("influence", overrides, config="validate-loo")`."""

    def __init__(self, base: Path):
        self.base = base
        self.made: dict[tuple[str, tuple[str, ...], str], Path] = {}

    def outputs(self, stage: str, overrides: list[str], config: str | None = None) -> Path:
        key = (stage, tuple(overrides), config or stage)
        if key not in self.made:
            from msif import stages

            root = self.base / f"runs-{len(self.made)}"
            with pytest.MonkeyPatch.context() as mp:
                for k, v in folders_in(root).items():
                    mp.setenv(k, v)
                getattr(stages, stage.replace("-", "_"))(compose_cfg(config or stage, list(overrides)))
            self.made[key] = root / "outputs"
        return self.made[key]

    def copy(
        self, stage: str, overrides: list[str], into: Path, upto: str | None = None, config: str | None = None
    ) -> Path:
        """Copy the finished runs into the output root `into` (run logs left out). `upto="pretrain"` copies only the
        pretrain run folder, `upto="finetune"` the pretrain and finetune folders (no influence tables)."""
        src = self.outputs(stage, overrides, config)
        below = STAGE_FOLDERS.get(upto or "")

        def ignore(folder: str, names: list[str]) -> list[str]:
            skip = [n for n in names if below and n.startswith(below)]
            if Path(folder) == src:
                skip.append("logs")
            return skip

        shutil.copytree(src, into, dirs_exist_ok=True, ignore=ignore)
        return into
