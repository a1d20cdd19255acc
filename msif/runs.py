"""Run folders and checkpoints: how stages hand over to each other on disk.

    <output_root>/<dataset>/<model>/pretrain-<sig>/                       the pretrained model
    <output_root>/<dataset>/<model>/pretrain-<sig>/finetune-<case>-<sig>/ the model finetuned from it

each holding checkpoint.pt, config.yaml (the resolved config), settings.json and metrics.json.

`<sig>` hashes exactly the settings that determine the stage's result (msif.config.*_settings), and a finetune folder
lives inside the pretrain folder it was made from. A checkpoint records its signature and settings; loading checks
both, so a checkpoint made with other settings is refused, never silently reused. `checkpoint.pt` is written last
(atomically), so its presence marks a finished run.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from msif.config import finetune_settings, influence_settings, pretrain_settings, signature, to_plain
from msif.errors import MsifError
from msif.io import atomic_torch_save, atomic_write_json, atomic_write_text

CHECKPOINT = "checkpoint.pt"
FORMAT = "msif-checkpoint/1"


@dataclass
class RunFolder:
    """Where a stage's results live, and the settings (and their signature) that determine them."""

    stage: str
    path: Path
    settings: dict[str, Any]
    marker: str = CHECKPOINT  # the file written last: its presence marks a finished run
    signature: str = field(init=False)

    def __post_init__(self):
        self.settings = to_plain(self.settings)
        self.signature = signature(self.settings)

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def complete(self) -> bool:
        return (self.path / self.marker).exists()


def pretrain_run(cfg: DictConfig) -> RunFolder:
    settings = pretrain_settings(cfg)
    sig = signature(settings)
    path = Path(cfg.output_root) / cfg.dataset.name / cfg.model.name / f"pretrain-{sig}"
    return RunFolder("pretrain", path, settings)


def finetune_run(cfg: DictConfig, pretrain: RunFolder) -> RunFolder:
    settings = finetune_settings(cfg, pretrain.signature)
    sig = signature(settings)
    return RunFolder("finetune", pretrain.path / f"finetune-{cfg.case.name}-{sig}", settings)


def influence_run(cfg: DictConfig, upstream: RunFolder) -> RunFolder:
    """In the finetune run folder (multi-stage), or in the pretrain run folder (single-stage: influence-single-*)."""
    settings = influence_settings(cfg, upstream.signature)
    kind = "influence-single" if settings.get("mode") == "single_stage" else "influence"
    return RunFolder("influence", upstream.path / f"{kind}-{signature(settings)}", settings, marker="summary.json")


def save_run(
    run: RunFolder, cfg: DictConfig, state: dict[str, Any], metrics: dict[str, Any], extra: dict[str, Any] | None = None
) -> None:
    """Write config.yaml, settings.json, metrics.json, then checkpoint.pt (each atomically)."""
    run.path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(OmegaConf.to_yaml(cfg, resolve=True), run.path / "config.yaml")
    atomic_write_json(
        {"stage": run.stage, "signature": run.signature, "settings": run.settings}, run.path / "settings.json"
    )
    atomic_write_json(metrics, run.path / "metrics.json")
    payload = {
        "format": FORMAT,
        "stage": run.stage,
        "signature": run.signature,
        "settings": json.dumps(run.settings, sort_keys=True),
        "state": state,
        **(extra or {}),
    }
    atomic_torch_save(payload, run.checkpoint)


def load_checkpoint(path: Path, run: RunFolder) -> dict[str, Any]:
    """Load and check a checkpoint: readable, the right stage, and made with `run`'s settings."""
    path = Path(path)
    rerun = f"Delete {path.parent} and rerun `msif {run.stage}` with the same overrides to recreate it."
    if not path.exists():
        raise MsifError(f"No {run.stage} checkpoint at {path}.", f"Run `msif {run.stage}` first.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise MsifError(f"The checkpoint {path} is corrupt or truncated ({type(err).__name__}).", rerun) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise MsifError(f"{path} is not an msif checkpoint (no '{FORMAT}' header).", rerun)
    if ckpt.get("stage") != run.stage:
        raise MsifError(
            f"{path} is a {ckpt.get('stage')} checkpoint, but a {run.stage} checkpoint was expected.",
            f"Point upstream.{run.stage} at a {run.stage} run folder.",
        )
    if ckpt.get("signature") != run.signature:
        theirs = json.loads(ckpt.get("settings", "{}"))
        diff = describe_difference(theirs, run.settings)
        raise MsifError(
            f"The {run.stage} checkpoint {path} was made with different settings than this run asks for "
            f"({diff}), so it is not reused.",
            "Run with the settings it was made with, or let msif make the matching checkpoint "
            "(drop upstream.* so the run folder is found from the settings).",
        )
    return ckpt


def describe_difference(theirs: dict, ours: dict, limit: int = 4) -> str:
    """`key: theirs -> ours` for the first few settings that differ, flattened with dots."""
    a, b = _flatten(theirs), _flatten(ours)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    parts = [f"{k}: checkpoint {a.get(k)!r} vs this run {b.get(k)!r}" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"and {len(keys) - limit} more")
    return "; ".join(parts) or "signature differs"


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def resolve_upstream(cfg: DictConfig, expected: RunFolder) -> Path:
    """The checkpoint to use for `expected`: the one named by `upstream.<stage>` or the run folder's own."""
    given = cfg.upstream.get(expected.stage)
    if not given:
        return expected.checkpoint
    p = Path(str(given))
    return p / CHECKPOINT if p.is_dir() or p.suffix != ".pt" else p
