"""Which test points make up the target T, which pretraining rows are scored, and the influence mode's data sets."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from msif.data import Examples, Tasks
from msif.errors import MsifError

TARGET_KINDS = ("test_set", "indices", "misclassified")


def is_single_stage(cfg: DictConfig) -> bool:
    return cfg.get("mode", "multi_stage") == "single_stage"


def label(cfg: DictConfig) -> str:
    return "single-stage" if is_single_stage(cfg) else f"case {cfg.case.name}"


def require_multi_stage(cfg: DictConfig, stage: str, why: str) -> None:
    """Refuse mode=single_stage in a stage that only makes sense for the two-stage model."""
    if is_single_stage(cfg):
        raise MsifError(
            f"{stage} {why}, so it uses multi-stage influence, but mode={cfg.mode} was given.",
            "Drop mode= (the default is mode=multi_stage).",
        )


def target_set(cfg: DictConfig, tasks: Tasks) -> Examples:
    """The test set T is drawn from: the finetune task's (multi-stage) or the pretraining task's (single-stage)."""
    return tasks.pretrain.test if is_single_stage(cfg) else tasks.finetune.test


def select_rows(indices, size: int, what: str = "score.indices", of: str = "pretraining set") -> torch.Tensor:
    """Validated row indices into a set of `size` rows (all rows when `indices` is None)."""
    if indices is None:
        return torch.arange(size)
    rows = list(indices) if not isinstance(indices, int) else [indices]
    bad = [i for i in rows if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < size]
    if not rows or bad:
        raise MsifError(
            f"{what} contains {bad[:5] if bad else 'nothing'}: not rows of the {of} (0..{size - 1}).",
            f"List row indices between 0 and {size - 1}, as the `index` column of the tables shows.",
        )
    if len(set(rows)) != len(rows):
        raise MsifError(f"{what} lists some rows more than once.", "List each row once.")
    return torch.tensor(rows)


def scored_rows(score: DictConfig, size: int) -> torch.Tensor:
    """The pretraining rows to score: score.indices, a seeded sample of score.sample rows (sorted), or all."""
    sample = score.get("sample")
    if sample is None:
        return select_rows(score.indices, size)
    if score.indices is not None:
        raise MsifError(
            "score.indices and score.sample are both set.", "Score either the listed rows or a sample, not both."
        )
    if sample > size:
        raise MsifError(
            f"score.sample={sample} asks for more rows than the pretraining set has ({size:,}).",
            f"Use score.sample={size} or less, or score.sample=null for all of them.",
        )
    gen = torch.Generator().manual_seed(int(score.get("seed", 0)))
    return torch.randperm(size, generator=gen)[:sample].sort().values


def check_target(target: DictConfig, test: Examples) -> None:
    """What can be checked of the target before any model exists (kind, explicit indices, max_points)."""
    if target.kind not in TARGET_KINDS:
        raise MsifError(f"Unknown target kind '{target.kind}'.", f"Use target.kind= one of {list(TARGET_KINDS)}.")
    if target.kind == "indices":
        if target.indices is None:
            raise MsifError("target.kind=indices needs target.indices.", "Pass e.g. target.indices=[0,5,17].")
        select_rows(target.indices, len(test), "target.indices", "finetune test set")


@torch.no_grad()
def predict(net: torch.nn.Module, test: Examples, device, batch_size: int) -> torch.Tensor:
    """The network's predicted label for every example of `test` (the network is left on the CPU)."""
    net = net.to(device).eval()
    chunks = [net(test.x[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(test), batch_size)]
    net.cpu()
    return torch.cat(chunks)


def select_targets(target: DictConfig, test: Examples, pred: torch.Tensor) -> torch.Tensor:
    """Rows of the test set that make up T (`pred`: the finetuned model's predictions)."""
    check_target(target, test)
    if target.kind == "test_set":
        rows = torch.arange(len(test))
    elif target.kind == "indices":
        rows = select_rows(target.indices, len(test), "target.indices", "finetune test set")
    else:
        rows = torch.nonzero(pred != test.y).flatten()
        if len(rows) == 0:
            raise MsifError(
                "target.kind=misclassified, but the finetuned model classifies every test example correctly.",
                "Use target.kind=test_set or target.indices=[...].",
            )
    if target.max_points is not None:
        rows = rows[: int(target.max_points)]
    return rows
