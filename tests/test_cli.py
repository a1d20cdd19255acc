"""The `msif` command end to end in a subprocess: stages chain through run folders, bad input gets a clear error."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import run_msif

TINY = ["dataset=tiny"]


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stdout + proc.stderr
    return proc


def refused(proc, *needles):
    """A clean refusal: nonzero exit, no traceback, and the message says what was wrong."""
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text
    assert "Traceback" not in text, text
    flat = " ".join(text.split())
    for n in needles:
        assert n in flat, f"{n!r} not in:\n{text}"
    return proc


def folders(root: Path, pattern: str) -> list[Path]:
    return sorted(p.parent for p in root.rglob(f"{pattern}/checkpoint.pt"))


def test_help_lists_the_stages_and_each_stage_has_hydra_help(env):
    top = ok(run_msif(["--help"], env))
    for stage in ("pretrain", "finetune", "influence", "validate-loo", "cleanse"):
        assert f"\n  {stage} " in top.stdout
    stage_help = ok(run_msif(["finetune", "--help"], env))
    assert "msif finetune" in stage_help.stdout and "case: fixed, updated" in stage_help.stdout


def test_pretrain_then_finetune_both_cases_chain_through_run_folders(env, tmp_path):
    out = tmp_path / "outputs"
    pre = ok(run_msif(["pretrain", *TINY], env))
    assert "pretrain" in pre.stdout and "accuracy" in pre.stdout
    (pre_dir,) = folders(out, "pretrain-*")
    for f in ("checkpoint.pt", "config.yaml", "metrics.json", "settings.json"):
        assert (pre_dir / f).is_file()

    fixed = ok(run_msif(["finetune", *TINY, "case=fixed"], env))
    updated = ok(run_msif(["finetune", *TINY, "case=updated"], env))
    assert "running `msif pretrain` first" not in fixed.stdout + updated.stdout
    assert folders(pre_dir, "finetune-fixed-*") and folders(pre_dir, "finetune-updated-*")
    assert folders(out, "pretrain-*") == [pre_dir], "finetune must reuse the pretrain run, not make another"

    again = ok(run_msif(["finetune", *TINY, "case=fixed"], env))
    assert "reusing" in again.stdout


def test_finetune_runs_missing_pretrain_first_and_says_so_unless_told_not_to(env, tmp_path):
    refused(run_msif(["finetune", *TINY, "upstream.auto=false"], env), "no pretrain checkpoint", "msif pretrain")
    assert not list((tmp_path / "outputs").rglob("checkpoint.pt"))
    proc = ok(run_msif(["finetune", *TINY], env))
    assert "running `msif pretrain` first" in proc.stdout
    assert len(list((tmp_path / "outputs").rglob("checkpoint.pt"))) == 2


def test_same_seed_same_settings_give_bit_identical_checkpoints_and_a_new_seed_does_not(env, tmp_path):
    ok(
        run_msif(
            ["finetune", "dataset=digits", "case=updated", "train.pretrain.steps=30", "train.finetune.steps=30"], env
        )
    )
    first = {p.relative_to(tmp_path / "outputs"): p for p in (tmp_path / "outputs").rglob("checkpoint.pt")}
    env2 = dict(env, MSIF_OUTPUTS=str(tmp_path / "again"))
    ok(
        run_msif(
            ["finetune", "dataset=digits", "case=updated", "train.pretrain.steps=30", "train.finetune.steps=30"], env2
        )
    )
    second = {p.relative_to(tmp_path / "again"): p for p in (tmp_path / "again").rglob("checkpoint.pt")}
    assert first.keys() == second.keys() and len(first) == 2
    for rel in first:
        a = torch.load(first[rel], weights_only=True)["state"]
        b = torch.load(second[rel], weights_only=True)["state"]
        for part in ("embedding", "head"):
            for k in a[part]:
                assert torch.equal(a[part][k], b[part][k]), f"{rel} {part}.{k} differs between identical runs"
    ok(run_msif(["pretrain", "dataset=digits", "train.pretrain.steps=30", "seed=1"], env2))
    assert len(list((tmp_path / "again").glob("digits/*/pretrain-*"))) == 2, "a new seed is a new run folder"


def test_multirun_sweeps_both_cases(env, tmp_path):
    ok(run_msif(["finetune", "-m", *TINY, "case=fixed,updated"], env))
    assert len(folders(tmp_path / "outputs", "finetune-*")) == 2


def test_explicit_upstream_made_with_other_settings_is_refused(env, tmp_path):
    ok(run_msif(["pretrain", *TINY, "seed=5"], env))
    (other,) = folders(tmp_path / "outputs", "pretrain-*")
    refused(
        run_msif(["finetune", *TINY, f"upstream.pretrain={other}"], env),
        "different settings",
        "seed: checkpoint 5 vs this run 0",
        "not reused",
    )
    assert len(list((tmp_path / "outputs").rglob("checkpoint.pt"))) == 1


def test_a_checkpoint_from_a_different_model_is_refused_and_kept(env, tmp_path):
    ok(run_msif(["pretrain", *TINY, "model.embedding.hidden=[4]"], env))
    (small,) = folders(tmp_path / "outputs", "pretrain-*")
    # Drop it where the default model's run would look: its recorded settings disagree, so it is refused.
    ok(run_msif(["pretrain", *TINY], env))
    (default,) = [p for p in folders(tmp_path / "outputs", "pretrain-*") if p != small]
    shutil.copy(small / "checkpoint.pt", default / "checkpoint.pt")
    before = (default / "checkpoint.pt").read_bytes()
    refused(run_msif(["finetune", *TINY], env), "different settings", "model.embedding.hidden")
    assert (default / "checkpoint.pt").read_bytes() == before


def test_a_corrupt_or_truncated_checkpoint_is_refused_and_left_in_place(env, tmp_path):
    ok(run_msif(["pretrain", *TINY], env))
    (pre_dir,) = folders(tmp_path / "outputs", "pretrain-*")
    ckpt = pre_dir / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    refused(run_msif(["finetune", *TINY], env), "corrupt or truncated", str(pre_dir))
    assert ckpt.stat().st_size == 200


@pytest.mark.parametrize(
    "args, needles",
    [
        (["dataset=nope"], ["Could not find 'dataset/nope'", "Available options"]),
        (["model=nope"], ["Could not find 'model/nope'"]),
        (["case=nope"], ["Could not find 'case/nope'"]),
        (["profile=gpu"], ["Unknown profile 'gpu'", "cpu"]),
        (["dataset=tiny", "dataset.pretrain.classes=[0,0,1]"], ["more than once"]),
        (["dataset=tiny", "dataset.finetune.n_train=100000"], ["asks for more examples"]),
        (["dataset=mnist", "dataset.download=false"], ["MNIST", "MSIF_DATA"]),
    ],
)
def test_bad_input_gets_a_clear_error_and_no_traceback(args, needles, env, tmp_path):
    refused(run_msif(["finetune", *args], env), *needles)
    assert not list((tmp_path / "outputs").rglob("checkpoint.pt"))


def test_unknown_stage(env):
    refused(run_msif(["pretrian"], env), "not an msif stage", "pretrain")
