"""Run folders and checkpoints: how stages hand over to each other on disk.

    <output_root>/<dataset>/<model>/pretrain-<sig>/                       the pretrained model
    <output_root>/<dataset>/<model>/pretrain-<sig>/finetune-<case>-<sig>/ the model finetuned from it

each holding checkpoint.pt, config.yaml (the resolved config), settings.json and metrics.json.

`<sig>` hashes exactly the settings that determine the stage's result (msif.config.*_settings), and a finetune folder
lives inside the pretrain folder it was made from. config.yaml is written by the lifecycle (msif.lifecycle) when a
stage starts; the rest by `save_run`. A checkpoint records its signature and settings; loading checks
both, so a checkpoint made with other settings is refused, never silently reused. `checkpoint.pt` is written last
(atomically), so its presence marks a finished run.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from msif.config import signature, to_plain
from msif.errors import MsifError
from msif.io import atomic_torch_save, atomic_write_json, update_with_file
from msif.models import TwoStageNet, strip_prefix

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


@dataclass
class Trained:
    """A finished pretrain or finetune stage: its run folder, the trained network (on CPU) and its metrics."""

    run: RunFolder
    net: TwoStageNet
    metrics: dict[str, Any]
    checkpoint: Path


def save_run(
    run: RunFolder, state: dict[str, Any], metrics: dict[str, Any], extra: dict[str, Any] | None = None
) -> None:
    """Write settings.json, metrics.json, then checkpoint.pt (each atomically)."""
    run.path.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        {"stage": run.stage, "signature": run.signature, "settings": run.settings}, run.path / "settings.json"
    )
    atomic_write_json(metrics, run.path / "metrics.json")
    payload = {
        "format": FORMAT,
        "stage": run.stage,
        "signature": run.signature,
        "settings": json.dumps(run.settings, sort_keys=True),
        "sha256": state_digest(state),
        "state": state,
        **(extra or {}),
    }
    atomic_torch_save(payload, run.checkpoint)


def load_checkpoint(path: Path, run: RunFolder) -> dict[str, Any]:
    """Load and check a checkpoint: readable, the right stage, and made with `run`'s settings."""
    path = Path(path)
    rerun = (
        f"Delete the file {path} (only it: the runs made from it stay in their folders) and rerun "
        f"`msif {run.stage}` with the same overrides to recreate it."
    )
    if not path.exists():
        raise MsifError(f"No {run.stage} checkpoint at {path}.", f"Run `msif {run.stage}` first.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise MsifError(f"The checkpoint {path} is corrupt or truncated ({type(err).__name__}).", rerun) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise MsifError(f"{path} is not an msif checkpoint (no '{FORMAT}' header).", rerun)
    if "sha256" in ckpt and state_digest(ckpt.get("state")) != ckpt["sha256"]:
        raise MsifError(
            f"The checkpoint {path} is corrupt: its weights do not match the SHA-256 written with them.", rerun
        )
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


def state_digest(state: Any) -> str:
    """SHA-256 of a checkpoint's tensors (names, dtypes, shapes and bytes, in name order). torch.load does not check
    the zip archive's CRCs, so a flipped byte in the weights would otherwise load silently."""
    h = hashlib.sha256()

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k in sorted(node):
                walk(f"{prefix}/{k}", node[k])
        elif isinstance(node, torch.Tensor):
            t = node.detach().cpu().contiguous()
            h.update(f"{prefix}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(f"{prefix}={node!r}".encode())

    walk("", state)
    return h.hexdigest()


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
        return expected.path / expected.marker
    p = Path(str(given))
    return p / CHECKPOINT if p.is_dir() or p.suffix != ".pt" else p


def load_state(net: TwoStageNet, state: dict[str, Any], path: Path) -> None:
    """Load `state` = {"embedding": ..., "head": ...} into `net`, refusing a checkpoint of another architecture."""
    try:
        net.embedding.load_state_dict(state["embedding"])
        net.head.load_state_dict(state["head"])
    except (KeyError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0][:300]
        raise MsifError(
            f"The checkpoint {path} does not fit the network this config builds ({first}).",
            "It was made with a different model; use the model config it was made with.",
        ) from None


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks; a missing file is named."""
    if not path.is_file():
        raise MsifError(
            f"The weights file {path} does not exist.",
            "Point weights.pretrain / weights.finetune at the state_dict file your script saved.",
        )
    h = hashlib.sha256()
    update_with_file(h, path)
    return h.hexdigest()[:16]


def read_weights(path: Path, rename: dict[str, str]) -> dict[str, torch.Tensor]:
    """A state_dict from a file saved by another script: a .safetensors file, or a torch file holding the tensors
    directly or under `state_dict` / `model` / `model_state_dict` (loaded with weights_only=True); DDP's `module.`
    prefix removed, then each key prefix in `rename` ({old: new}) replaced."""
    path = Path(path).expanduser()
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path))
        except Exception as err:  # noqa: BLE001 - the library's own error says what is wrong with the file
            raise MsifError(f"{path} is not a readable safetensors file ({err}).", "Save it again.") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError) as err:
            raise MsifError(
                f"{path} could not be loaded as weights only ({type(err).__name__}: {str(err).splitlines()[0][:200]}).",
                "Save the network's state_dict (torch.save(net.state_dict(), path)), not the pickled module.",
            ) from None
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MsifError(
            f"{path} does not hold a state_dict (a mapping of parameter names to tensors).",
            "Save net.state_dict(), or a dict with it under 'state_dict'.",
        )
    state = strip_prefix(dict(state))
    for old, new in (rename or {}).items():
        state = {(new + k[len(old) :] if k == old or k.startswith(old + ".") else k): v for k, v in state.items()}
    return state


def load_weights(net: TwoStageNet, state: dict[str, torch.Tensor], path: Path, stage: str) -> None:
    """Load a foreign state_dict into `net`, refusing with every missing, unexpected or mis-shaped key listed."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        stats = [k for k in missing if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        note = " (batch-norm running statistics among them)" if stats else ""
        parts = [
            f"missing {missing[:8]}{note}" if missing else "",
            f"unexpected {unexpected[:8]}" if unexpected else "",
            f"mis-shaped {shapes[:8]}" if shapes else "",
        ]
        raise MsifError(
            f"The weights {path} (weights.{stage}) do not fit the network the model config builds: "
            + "; ".join(p for p in parts if p)
            + ".",
            "The network's keys are embedding.<...> and head.<...>: choose the model config your script used, "
            "rename key prefixes with weights.rename={features:embedding,classifier:head}, and save the state_dict "
            "with its buffers (net.state_dict() includes the batch-norm statistics).",
        )
    net.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def state_of(net: TwoStageNet) -> dict[str, Any]:
    return {
        "embedding": {k: v.detach().cpu().clone() for k, v in net.embedding.state_dict().items()},
        "head": {k: v.detach().cpu().clone() for k, v in net.head.state_dict().items()},
    }


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
