"""Config helpers shared by every stage: resolvers, run signatures, and early validation.

A *signature* is a short hash of exactly the settings that determine a stage's result. Run folders are named by it,
so rerunning with the same settings finds the same folder and a changed setting can never reuse a stale checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from msif.errors import MsifError

CONF_DIR = str(Path(__file__).resolve().parent / "conf")  # the shipped configs (installed inside the package)

# Bump when a change in the code changes what a stage computes from the same settings.
FORMAT_VERSION = 2  # 2: data fingerprints and per-stage sources in the signatures


def register_resolvers() -> None:
    """Register msif's OmegaConf resolvers (idempotent): `${mul:a,b}`."""
    if not OmegaConf.has_resolver("mul"):
        OmegaConf.register_new_resolver("mul", lambda a, b: a * b)


register_resolvers()  # whoever composes a config imports this module first


def to_plain(node: Any) -> Any:
    """A resolved plain-Python copy of a config node (dicts, lists, scalars)."""
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    if isinstance(node, dict):
        return {k: to_plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [to_plain(v) for v in node]
    return node


def signature(parts: dict[str, Any]) -> str:
    """A 10-hex-digit hash of `parts` (resolved, key order irrelevant)."""
    blob = json.dumps(to_plain(parts), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def pretrain_settings(cfg: DictConfig) -> dict[str, Any]:
    """The settings that determine a pretrain checkpoint (and nothing else: not paths, not the finetune task): the
    pretraining data's source and fingerprint, the network and the code of the user's network classes."""
    code = code_fingerprint(cfg.model)
    return {
        "version": FORMAT_VERSION,
        "data": data_settings(cfg.dataset, "pretrain"),
        "model": cfg.model,
        **({"model_code": code} if code else {}),
        **trained_by(cfg, "pretrain"),
        "dtype": cfg.dtype,
    }


def trained_by(cfg: DictConfig, stage: str) -> dict[str, Any]:
    """How a stage's network came about: trained here (its recipe and seed), or imported from a file (its content
    hash and the key renames; the recipe then played no part)."""
    path = OmegaConf.select(cfg, f"weights.{stage}")
    if not path:
        return {"train": cfg.train[stage], "seed": cfg.seed}
    from msif.runs import file_digest

    return {"weights": {"sha256": file_digest(Path(str(path)).expanduser()), "rename": to_plain(cfg.weights.rename)}}


def finetune_settings(cfg: DictConfig, pretrain_signature: str) -> dict[str, Any]:
    """The settings that determine a finetune checkpoint, chained to its pretrain checkpoint's signature."""
    case = {"name": cfg.case.name, "update_embedding": cfg.case.name == "updated"}
    if cfg.case.get("proximal", False):
        case["alpha"] = cfg.case.alpha  # alpha changes training only when the proximal term is on
        case["proximal"] = True
    return {
        "version": FORMAT_VERSION,
        "pretrain": pretrain_signature,
        "finetune_data": data_settings(cfg.dataset, "finetune"),
        "case": case,
        **trained_by(cfg, "finetune"),
    }


def data_settings(ds: DictConfig, stage: str) -> dict[str, Any]:
    """What a stage's data are: its source spec without the paths it is reached by (`download` neither), the
    fingerprint of the files it reads, and the stage's own selection (classes, sizes, seeds, label noise)."""
    from msif.data.sources import PATH_KEYS, fingerprint, source_spec

    spec = source_spec(ds, stage)
    what = {k: v for k, v in spec.items() if k not in (*PATH_KEYS, "where", "download")}
    selection = {k: v for k, v in to_plain(ds[stage]).items() if k != "source"}
    return {"source": what, "fingerprint": fingerprint(spec), stage: selection}


def code_fingerprint(model: DictConfig) -> dict[str, str]:
    """A hash of the source file of each network class the model config names outside msif and torch (the user's
    own), so an edit of that code makes a new run instead of reusing checkpoints of the old one. msif's own
    networks are covered by FORMAT_VERSION."""
    import importlib
    import inspect

    out = {}
    for part in ("embedding", "head", "pretrain_head", "finetune_head"):
        target = str(model[part].get("_target_", "")) if model.get(part) else ""
        if not target or target.startswith(("msif.", "torch.", "torchvision.")):
            continue
        try:
            module = importlib.import_module(target.rsplit(".", 1)[0])
            out[part] = hashlib.sha256(Path(inspect.getsourcefile(module)).read_bytes()).hexdigest()[:16]
        except Exception:  # noqa: BLE001 - building the network names the problem with its own message
            out[part] = "unavailable"
    return out


def validate_config(cfg: DictConfig) -> None:
    """Fail early, with a clear message, on settings that would otherwise fail deep inside a run: the schema of
    every group (msif.schema) and, for influence configs, the typed solver settings."""
    from msif.schema import check_config

    check_config(cfg)
    if "solver" in cfg:
        check_response(cfg, solver_group(cfg))


def resolve_device(name: str):
    """`auto` -> CUDA when present, else CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MsifError(f"Unknown device '{name}'.", "Use device=auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MsifError(f"device={name} was asked for but this machine has no CUDA GPU.", "Use device=auto or cpu.")
    return device


def resolve_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float64": torch.float64}[name]


# Hessian settings that change how HVPs are formed, not the numbers (up to rounding): not part of a run's signature
HOW_NOT_WHAT = ("graph_budget_gib",)


def score_settings(score: DictConfig) -> dict[str, Any]:
    """Which rows are scored (a run scoring all of them keeps the signature it had before samples existed)."""
    out = {"indices": score.indices}
    if score.get("sample") is not None:
        out |= {"sample": int(score.sample), "seed": int(score.get("seed", 0))}
    return out


def influence_settings(cfg: DictConfig, finetune_signature: str) -> dict[str, Any]:
    """The settings that determine an influence table, chained to its finetune checkpoint's signature (single-stage:
    the pretrain checkpoint's)."""
    extra = {}
    if response_kind(cfg) == "retrain":  # the inverse's runs keep the signatures they had before this setting
        extra["response"] = cfg.response
    if cfg.get("embedding_params") is not None:  # part of W tracked: runs that track all of it keep their signatures
        extra["embedding_params"] = list(cfg.embedding_params)
    if cfg.get("mode", "multi_stage") == "single_stage":  # chained to the pretrain run; no finetune case
        return extra | {
            "version": FORMAT_VERSION,
            "mode": "single_stage",
            "pretrain": finetune_signature,
            "solver": cfg.solver.pretrain,
            "target": {k: v for k, v in cfg.target.items() if k != "chunk"},
            "score": score_settings(cfg.score),
            "hessian": {
                k: v for k, v in cfg.hessian.items() if k not in ("batch_size", "finetune_sample", *HOW_NOT_WHAT)
            },
            "dtype": cfg.dtype,
        }
    return extra | {
        "version": FORMAT_VERSION,
        "finetune": finetune_signature,
        "case": {"name": cfg.case.name, "alpha": cfg.case.get("alpha")},
        "solver": cfg.solver,
        "target": {k: v for k, v in cfg.target.items() if k != "chunk"},
        "score": score_settings(cfg.score),
        "hessian": {k: v for k, v in cfg.hessian.items() if k not in ("batch_size", *HOW_NOT_WHAT)},
        "dtype": cfg.dtype,
    }


RESPONSE_METHODS = ("lanczos", "exact")  # the solvers that can apply the retrain response (a matrix function)


def response_kind(cfg: DictConfig) -> str:
    """What stands in for each inverse Hessian: "retrain" when `response.kind=retrain` (profile cpu's default) and
    both solvers can apply it; else "inverse" (the other solvers compute a damped inverse, and say so)."""
    response = cfg.get("response")
    if response is None or response.kind != "retrain" or "solver" not in cfg:
        return "inverse"
    methods = [cfg.solver[side].method for side in ("pretrain", "finetune")]
    return "retrain" if all(m in RESPONSE_METHODS for m in methods) else "inverse"


def check_response(cfg: DictConfig, solvers: dict) -> None:
    """The retrain response needs the retrains' SGD learning rate."""
    if response_kind(cfg) == "retrain" and cfg.response.lr is None:
        raise MsifError(
            "response.kind=retrain predicts the response of SGD steps, but response.lr is null (the training "
            "recipe's optimizer may not even be SGD).",
            "Set response.lr (validate-loo: loo.lr) to the retrains' SGD learning rate, or use response.kind=inverse.",
        )


def response_solvers(cfg: DictConfig, solvers: dict, m: int) -> dict:
    """The solver settings with the retrain response filled in when it applies (`response_kind`): η = response.lr
    for both, K = response.finetune_steps for the finetune Hessian and K_p (steps, or whole passes over the m
    pretraining examples in batches of the pretrain recipe's) for the pretrain one; else `solvers` as they are."""
    import dataclasses
    import logging

    from msif.training import retrain_schedule

    if response_kind(cfg) != "retrain":
        if cfg.get("response") is not None and cfg.response.kind == "retrain":
            methods = sorted({s.method for s in solvers.values()} - set(RESPONSE_METHODS))
            logging.getLogger(__name__).info(
                "solver %s computes a damped inverse; the retrain response (response.kind=retrain) needs lanczos "
                "or exact, so these scores use the inverse",
                "/".join(methods),
            )
        return solvers
    check_response(cfg, solvers)
    response = cfg.response
    k_p, _ = retrain_schedule(
        m,
        int(cfg.train.pretrain.batch_size),
        response.pretrain_steps,
        response.pretrain_epochs,
        int(cfg.profile.loo[cfg.train.name].pretrain),
    )
    steps = {"pretrain": k_p, "finetune": int(response.finetune_steps)}
    return {
        side: dataclasses.replace(s, retrain_lr=float(response.lr), retrain_steps=steps[side])
        for side, s in solvers.items()
    }


def solver_group(cfg: DictConfig) -> dict:
    """The `solver` group as typed, validated settings per Hessian (msif.influence.settings); a bad key is refused
    with its full name (solver.pretrain.<key>)."""
    from msif.influence.settings import solver_settings

    return {side: solver_settings(to_plain(cfg.solver[side]), side) for side in ("pretrain", "finetune")}
