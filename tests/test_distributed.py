"""`torchrun --nproc-per-node 2 -m msif influence`: two CPU processes (gloo) give the single-process table.

The torchrun launch is a real subprocess (that is what is tested); the single-process reference runs in this process
with one torch thread, the threads each torchrun worker gets (OMP_NUM_THREADS=1)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers.cli import msif, msif_subprocess, ok, refused

TIGHT = [f"solver.{h}.{k}={v}" for h in ("pretrain", "finetune") for k, v in (("tol", 1e-11), ("iterations", 300))]


def torchrun(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "msif"]
    return msif_subprocess(args, env | {"OMP_NUM_THREADS": "1"}, command=cmd)


def table(root: Path) -> tuple[pd.DataFrame, dict]:
    (summary,) = root.rglob("influence*/summary.json")
    return pd.read_parquet(summary.parent / "scores.parquet"), json.loads(summary.read_text())


@pytest.mark.parametrize(
    "args",
    [
        # the digits cases (a conv net, a minute here) are slow; the tiny per-test case keeps torchrun in the fast suite
        pytest.param(["dataset=digits", "dtype=float64", "case=fixed", "score.part_rows=100"], marks=pytest.mark.slow),
        # the solves stop at a relative residual of solver.*.tol, so equality to 1e-6 needs a tol well below it:
        # summing the Hessian in another order moves where CG stops by about the tolerance
        pytest.param(
            ["dataset=digits", "dtype=float64", "case=updated", "score.part_rows=100", *TIGHT], marks=pytest.mark.slow
        ),
        ["dataset=tiny", "dtype=float64", "target.per_test=true", "target.kind=indices", "target.indices=[1,4,9]"]
        + ["target.chunk=2"],
        pytest.param(["dataset=tiny", "mode=single_stage", "score.part_rows=50"], marks=pytest.mark.slow),
    ],
    ids=["digits-fixed", "digits-updated", "tiny-per-test", "tiny-single-stage"],
)
def test_two_processes_give_the_single_process_scores(args, env, tmp_path):
    sharded = ok(torchrun(["influence", *args], env | {"MSIF_OUTPUTS": str(tmp_path / "two")}))
    # the same threads per process, so that only the sharding differs between the two runs
    ok(msif(["influence", *args], {"MSIF_OUTPUTS": str(tmp_path / "one")}, threads=1))
    two, summary = table(tmp_path / "two")
    one, _ = table(tmp_path / "one")
    assert summary["processes"] == 2
    assert sharded.stdout.count("scores:") == 1  # one process prints the table
    derived = ["score", "predicted_removal_effect", "rank"]  # rank may swap near-ties
    pd.testing.assert_frame_equal(two.drop(columns=derived), one.drop(columns=derived))
    rel = np.abs(two["score"] - one["score"]).max() / np.abs(one["score"]).max()
    assert rel <= 1e-6, rel


def test_stages_that_do_not_shard_refuse_to_run_under_torchrun(env):
    refused(msif(["validate-loo", "dataset=tiny"], {"WORLD_SIZE": "2"}), "torchrun", "loo.workers")
