"""The influence score table: one row per (pretraining example, target), and its summary statistics."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from msif.data import Examples
from msif.errors import MsifError
from msif.io import atomic_write_bytes


def score_table(
    scores: torch.Tensor,
    rows: torch.Tensor,
    pre_set: Examples,
    targets: torch.Tensor | None,
    test: Examples,
    pred: torch.Tensor,
) -> pd.DataFrame:
    """The long table (README, "Score table"): scores (len(rows), K) of the pretraining `rows`; per-test columns when
    `targets` (the K test rows) is given."""
    m = len(pre_set)
    base = {
        "index": rows.numpy(),
        "source_index": pre_set.source_index[rows].numpy(),
        "label": pre_set.labels(rows),
        "class_name": pre_set.label_names(rows).astype(str),
    }
    if pre_set.texts is not None:  # text: each pretraining sentence, and the test sentence of per-test rows
        base["text"] = np.array(pre_set.texts, dtype=object)[rows.numpy()]
    frames = []
    for k in range(scores.shape[1]):
        s = scores[:, k].double().numpy()
        f = pd.DataFrame(base)
        if targets is not None:
            t = int(targets[k])
            f.insert(0, "test_index", t)
            f.insert(1, "test_source_index", int(test.source_index[t]))
            f.insert(2, "test_label", int(test.y[t]))
            f.insert(3, "test_class_name", test.class_names[int(test.y[t])])
            f.insert(4, "test_prediction", test.class_names[int(pred[t])])
            if test.texts is not None:
                f.insert(5, "test_text", test.texts[t])
        f["score"] = s
        f["predicted_removal_effect"] = -s / m
        f["rank"] = pd.Series(s).rank(ascending=False, method="first").astype(int).to_numpy()
        frames.append(f)
    return pd.concat(frames, ignore_index=True)


def score_stats(s: np.ndarray) -> dict:
    return {
        "mean": float(s.mean()),
        "mean_abs": float(np.abs(s).mean()),
        "std": float(s.std()),
        "min": float(s.min()),
        "max": float(s.max()),
        "positive_fraction": float((s > 0).mean()),
    }


def write_parquet(frame: pd.DataFrame, path: Path) -> str:
    """Write the table atomically; its SHA-256, which summary.json records so a reused table is checked."""
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    atomic_write_bytes(buf.getvalue(), path)
    return hashlib.sha256(buf.getvalue()).hexdigest()


def read_parquet(path: Path, sha256: str | None) -> pd.DataFrame:
    """A score table written by `write_parquet`, refused when it does not match `sha256` (None: not recorded) or
    does not parse."""
    fix = "Rerun the same command with force=true to compute it again."
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise MsifError(f"Cannot read the score table {path} ({err.strerror}).", fix) from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise MsifError(f"The score table {path} is corrupt: it does not match the SHA-256 in summary.json.", fix)
    try:
        return pd.read_parquet(io.BytesIO(data))
    except Exception as err:  # noqa: BLE001  (pyarrow raises its own types for a damaged file)
        raise MsifError(f"The score table {path} is not a readable parquet file ({type(err).__name__}).", fix) from None
