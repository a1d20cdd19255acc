"""The `msif` command end to end (run in this process, as `msif.cli.main`): stages chain through run folders, bad
input gets a clear error; and in fresh processes, that `python -m msif` starts and a rerun reproduces a run exactly."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.helpers.cli import folders, msif, msif_subprocess, ok, refused

TINY = ["dataset=tiny"]


def test_help_lists_the_stages_and_each_stage_has_hydra_help(env):
    top = ok(msif(["--help"]))
    for stage in ("pretrain", "finetune", "influence", "validate-loo", "cleanse"):
        assert f"\n  {stage} " in top.stdout
    stage_help = ok(msif(["finetune", "--help"]))
    assert "msif finetune" in stage_help.stdout and "case: fixed, updated" in stage_help.stdout


def test_pretrain_then_finetune_both_cases_chain_through_run_folders(env, tmp_path):
    out = tmp_path / "outputs"
    pre = ok(msif(["pretrain", *TINY]))
    assert "pretrain" in pre.stdout and "accuracy" in pre.stdout
    (pre_dir,) = folders(out, "pretrain-*")
    for f in ("checkpoint.pt", "config.yaml", "metrics.json", "settings.json"):
        assert (pre_dir / f).is_file()

    fixed = ok(msif(["finetune", *TINY, "case=fixed"]))
    updated = ok(msif(["finetune", *TINY, "case=updated"]))
    assert "running `msif pretrain` first" not in fixed.stdout + updated.stdout
    assert folders(pre_dir, "finetune-fixed-*") and folders(pre_dir, "finetune-updated-*")
    assert folders(out, "pretrain-*") == [pre_dir], "finetune must reuse the pretrain run, not make another"

    again = ok(msif(["finetune", *TINY, "case=fixed"]))
    assert "reusing" in again.stdout


def test_finetune_runs_missing_pretrain_first_and_says_so_unless_told_not_to(env, tmp_path):
    refused(msif(["finetune", *TINY, "upstream.auto=false"]), "no pretrain checkpoint", "msif pretrain")
    assert not list((tmp_path / "outputs").rglob("checkpoint.pt"))
    proc = ok(msif(["finetune", *TINY]))
    assert "running `msif pretrain` first" in proc.stdout
    assert len(list((tmp_path / "outputs").rglob("checkpoint.pt"))) == 2


DIGITS_30 = ["finetune", "dataset=digits", "case=updated", "train.pretrain.steps=30", "train.finetune.steps=30"]


def test_same_seed_same_settings_give_bit_identical_checkpoints_and_a_new_seed_does_not(env, tmp_path):
    """The rerun is a fresh `python -m msif` process (its own hash seed, nothing left from the first run's process):
    reproducing a run is rerunning the command."""
    ok(msif(DIGITS_30))
    first = {p.relative_to(tmp_path / "outputs"): p for p in (tmp_path / "outputs").rglob("checkpoint.pt")}
    ok(msif_subprocess(DIGITS_30, {"MSIF_OUTPUTS": str(tmp_path / "again")}))
    second = {p.relative_to(tmp_path / "again"): p for p in (tmp_path / "again").rglob("checkpoint.pt")}
    assert first.keys() == second.keys() and len(first) == 2
    for rel in first:
        a = torch.load(first[rel], weights_only=True)["state"]
        b = torch.load(second[rel], weights_only=True)["state"]
        for part in ("embedding", "head"):
            for k in a[part]:
                assert torch.equal(a[part][k], b[part][k]), f"{rel} {part}.{k} differs between identical runs"
    ok(
        msif(
            ["pretrain", "dataset=digits", "train.pretrain.steps=30", "seed=1"],
            {"MSIF_OUTPUTS": str(tmp_path / "again")},
        )
    )
    assert len(list((tmp_path / "again").glob("digits/*/pretrain-*"))) == 2, "a new seed is a new run folder"


def test_multirun_sweeps_both_cases(env, tmp_path):
    ok(msif(["finetune", "-m", *TINY, "case=fixed,updated"]))
    assert len(folders(tmp_path / "outputs", "finetune-*")) == 2


def test_explicit_upstream_made_with_other_settings_is_refused(env, tmp_path):
    ok(msif(["pretrain", *TINY, "seed=5"]))
    (other,) = folders(tmp_path / "outputs", "pretrain-*")
    refused(
        msif(["finetune", *TINY, f"upstream.pretrain={other}"]),
        "different settings",
        "seed: checkpoint 5 vs this run 0",
        "not reused",
    )
    assert len(list((tmp_path / "outputs").rglob("checkpoint.pt"))) == 1


def test_a_checkpoint_from_a_different_model_is_refused_and_kept(env, tmp_path, prebuilt):
    ok(msif(["pretrain", *TINY, "model.embedding.hidden=[4]"]))
    (small,) = folders(tmp_path / "outputs", "pretrain-*")
    # Drop it where the default model's run would look: its recorded settings disagree, so it is refused.
    prebuilt("pretrain", TINY)
    (default,) = [p for p in folders(tmp_path / "outputs", "pretrain-*") if p != small]
    shutil.copy(small / "checkpoint.pt", default / "checkpoint.pt")
    before = (default / "checkpoint.pt").read_bytes()
    refused(msif(["finetune", *TINY]), "different settings", "model.embedding.hidden")
    assert (default / "checkpoint.pt").read_bytes() == before


def test_a_corrupt_or_truncated_checkpoint_is_refused_and_left_in_place(env, tmp_path, prebuilt):
    prebuilt("pretrain", TINY)
    (pre_dir,) = folders(tmp_path / "outputs", "pretrain-*")
    ckpt = pre_dir / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    refused(msif(["finetune", *TINY]), "corrupt or truncated", str(pre_dir))
    assert ckpt.stat().st_size == 200


def test_a_flipped_byte_in_a_checkpoints_weights_is_refused(env, tmp_path, prebuilt):
    """torch.load does not check the archive's CRCs: a checkpoint carries a SHA-256 of its weights instead."""
    prebuilt("pretrain", TINY)
    (pre_dir,) = folders(tmp_path / "outputs", "pretrain-*")
    ckpt = pre_dir / "checkpoint.pt"
    data = bytearray(ckpt.read_bytes())
    weight = torch.load(ckpt, weights_only=True)["state"]["embedding"]["1.weight"]
    at = bytes(data).find(weight.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    assert at > 0, "the weights are stored as they are in the archive"
    data[at + 5] ^= 0x01  # one bit of one float
    ckpt.write_bytes(bytes(data))
    assert not torch.equal(torch.load(ckpt, weights_only=True)["state"]["embedding"]["1.weight"], weight)
    refused(msif(["finetune", *TINY]), "is corrupt", "SHA-256", str(ckpt))
    assert not list((tmp_path / "outputs").rglob("finetune-*/checkpoint.pt"))


@pytest.mark.parametrize(
    "args, needles",
    [
        (["dataset=nope"], ["Could not find 'dataset/nope'", "Available options"]),
        (["model=nope"], ["Could not find 'model/nope'"]),
        (["case=nope"], ["Could not find 'case/nope'"]),
        (["profile=gpu"], ["Could not find 'profile/gpu'", "cpu paper"]),
        (["dataset=tiny", "dataset.pretrain.classes=[0,0,1]"], ["more than once"]),
        (["dataset=tiny", "dataset.finetune.n_train=100000"], ["asks for more examples"]),
        (["dataset=mnist", "dataset.download=false"], ["MNIST", "MSIF_DATA"]),
    ],
)
def test_bad_input_gets_a_clear_error_and_no_traceback(args, needles, env, tmp_path):
    refused(msif(["finetune", *args]), *needles)
    assert not list((tmp_path / "outputs").rglob("checkpoint.pt"))


def test_unknown_stage(env):
    refused(msif(["pretrian"]), "not an msif stage", "pretrain")


def test_python_dash_m_msif_starts_in_a_fresh_process_and_the_console_script_points_at_its_main(env):
    from importlib.metadata import entry_points

    proc = ok(msif_subprocess(["--help"]))
    for stage in ("pretrain", "finetune", "influence", "validate-loo", "cleanse", "reproduce"):
        assert f"\n  {stage} " in proc.stdout
    refused(msif_subprocess(["pretrian"]), "not an msif stage")
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "msif"]
    assert script.value == "msif.cli:main"


def test_in_process_runs_leave_nothing_behind_for_the_next(env, tmp_path):
    """The tests run `msif` in their own process (tests/helpers/cli.py), one Hydra app after another: each run
    prints to the stream it should, leaves no Hydra job folder, and afterwards sys.argv, the root logger, Hydra's global
    state and the torch threads are as they were."""
    import logging
    import sys

    from hydra.core.global_hydra import GlobalHydra

    root = logging.getLogger()
    before = (list(sys.argv), list(root.handlers), root.level, torch.get_num_threads())
    first = ok(msif(["pretrain", *TINY]))
    second = ok(msif(["pretrain", *TINY]))
    assert "accuracy" in first.stdout and "reusing" not in first.stdout and "reusing" in second.stdout
    assert first.stderr == second.stderr == ""
    wrong = refused(msif(["pretrian"]), "not an msif stage")
    assert "not an msif stage" in wrong.stderr and wrong.stdout == ""
    assert (list(sys.argv), list(root.handlers), root.level, torch.get_num_threads()) == before
    assert not GlobalHydra.instance().is_initialized()
    assert not (tmp_path / "outputs" / "logs").exists(), "no Hydra job folders: results live in run folders"
    assert not logging.getLogger("msif").handlers, "the console handler is removed after each run"


def test_training_that_diverges_stops_without_a_checkpoint(env, tmp_path, monkeypatch):
    """A non-finite loss ends the stage with an error (an infinite lr is refused by the schema before that)."""
    import torch.nn.functional as F

    from msif import training

    real = F.cross_entropy
    monkeypatch.setattr(training.F, "cross_entropy", lambda logits, y, **kw: real(logits, y, **kw) * float("nan"))
    refused(msif(["pretrain", *TINY]), "Training diverged", "loss is nan", "train.pretrain.lr")
    assert not list((tmp_path / "outputs").rglob("checkpoint.pt"))
    refused(msif(["pretrain", *TINY, "train.pretrain.lr=inf"]), "train.pretrain.lr must be > 0")


def test_a_log_or_pipe_gets_progress_lines_at_a_bounded_rate_with_count_rate_and_eta():
    import io

    from rich.console import Console

    from msif.console import LineProgress

    now = [0.0]
    out = io.StringIO()
    bar = LineProgress(Console(file=out, width=200), interval=30.0, clock=lambda: now[0])
    with bar:
        task = bar.add_task("leave-one-out retrains", total=10, completed=2, info="")
        for i in range(3, 11):
            now[0] += 10.0  # a retrain every 10 s: a line every third one, and one at the end
            bar.update(task, completed=i, info=f"r = +0.{i}")
    lines = out.getvalue().splitlines()
    assert lines[0] == "leave-one-out retrains: 5/10, 30 s elapsed, 10 s each, eta 50 s, r = +0.5"  # 2 resumed
    assert lines[-1].startswith("leave-one-out retrains: 10/10, 80 s elapsed") and "eta" not in lines[-1]
    assert len(lines) == 3  # at 30 s, 60 s and the completion (80 s)


def test_a_ctrl_c_while_a_config_is_composed_is_held_until_composing_ends():
    import os
    import signal

    from msif.cli import deferred_interrupts, interrupts_allowed

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as an interactive `msif` starts
    try:
        reached = []
        with pytest.raises(KeyboardInterrupt):
            with deferred_interrupts():
                os.kill(os.getpid(), signal.SIGINT)  # delivered now, in the middle of "composing"
                reached.append("after the signal")
        assert reached == ["after the signal"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with pytest.raises(KeyboardInterrupt):  # one held before the stage starts is raised as the stage starts
            with deferred_interrupts():
                os.kill(os.getpid(), signal.SIGINT)
                with interrupts_allowed():
                    reached.append("the stage ran")
        assert reached == ["after the signal"]
        with deferred_interrupts():  # nothing pending: nothing raised, and the stage itself is interruptible
            with interrupts_allowed():
                assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_ctrl_c_that_the_user_ignores_stays_ignored():
    """Started under nohup (or in a script's background) Ctrl-C is ignored: msif must not turn it back on."""
    import os
    import signal

    from msif.cli import deferred_interrupts, interrupts_allowed

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with deferred_interrupts():
            with interrupts_allowed():
                assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
                os.kill(os.getpid(), signal.SIGINT)  # ignored: nothing raised, now or later
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
