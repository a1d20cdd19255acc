"""Signals to a running command with worker processes: the workers die with it, and Ctrl-C keeps what finished.

Fault-injection tests (`make test-faults`, run by CI): each starts `python -m msif` in a child process and signals it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.faults

# Retrains long enough (a few seconds each on one thread) to be caught in flight, 6 of them over 2 workers.
LOO = ["dataset=tiny", "loo.k=6", "loo.pretrain_steps=4000", "loo.finetune_steps=200", "loo.repeats=1",
       "loo.bootstrap=50", "loo.workers=2", "loo.threads=1"]  # fmt: skip


def start(tmp_path: Path, *args: str) -> subprocess.Popen:
    env = os.environ | {
        "MSIF_OUTPUTS": str(tmp_path / "out"),
        "MSIF_CACHE": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "msif", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # as a terminal's Ctrl-C finds it: a shell starting the suite in the background (`&`) ignores SIGINT, and
        # an ignored SIGINT would be inherited
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def workers(pid: int) -> list[int]:
    """The pool workers `pid` spawned (from /proc: Linux, as on CI), not multiprocessing's resource tracker."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if int(fields[1]) == pid and b"spawn_main" in command:
                out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(condition, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def rows(tmp_path: Path) -> int:
    found = list((tmp_path / "out").rglob("loo.csv"))
    return len(pd.read_csv(found[0])) if found else 0


@pytest.fixture
def built(tmp_path):
    """The tiny influence run the retrains build on, made once before any signal."""
    proc = start(tmp_path, "influence", "dataset=tiny")
    assert proc.wait(timeout=300) == 0, proc.stdout.read()
    return tmp_path


def workers_started(proc: subprocess.Popen) -> list[int]:
    kids: list[int] = []

    def ready() -> bool:
        kids[:] = [k for k in workers(proc.pid) if alive(k)]
        return len(kids) >= 2

    wait_for(ready, 120, "the worker processes")
    return kids


def test_sigkill_of_the_command_takes_its_workers_with_it(built):
    proc = start(built, "validate-loo", *LOO)
    kids = workers_started(proc)
    time.sleep(1.0)
    proc.kill()
    proc.wait(timeout=30)
    wait_for(lambda: not any(alive(k) for k in kids), 15, "the workers to end after their parent's SIGKILL")


def test_ctrl_c_stops_the_workers_keeps_the_finished_retrains_and_the_rerun_completes_the_same_table(built):
    proc = start(built, "validate-loo", *LOO)
    kids = workers_started(proc)
    wait_for(lambda: rows(built) >= 1, 240, "the first finished retrain")
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    out, _ = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 15, "Ctrl-C waited for the running retrains"
    assert proc.returncode == 130 and "Traceback" not in out and "was interrupted" in out, out
    wait_for(lambda: not any(alive(k) for k in kids), 15, "the workers to end after Ctrl-C")
    kept = rows(built)
    assert 1 <= kept < 6
    rerun = start(built, "validate-loo", *LOO)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out
    assert f"{kept} already done" in " ".join(out.split()), out
    (csv,) = (built / "out").rglob("loo.csv")
    resumed = pd.read_csv(csv).set_index("index").sort_index()
    # the same retrains uninterrupted, in a fresh output root that reuses the influence run
    fresh = built / "fresh"
    (fresh / "out").mkdir(parents=True)
    src = next((built / "out").iterdir())
    subprocess.run(["cp", "-r", str(src), str(fresh / "out")], check=True)
    for leftover in (fresh / "out").rglob("loo-*"):
        subprocess.run(["rm", "-r", str(leftover)], check=True)
    again = start(fresh, "validate-loo", *LOO)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out
    (csv2,) = (fresh / "out").rglob("loo.csv")
    whole = pd.read_csv(csv2).set_index("index").sort_index()
    pd.testing.assert_series_equal(resumed["actual_effect"], whole["actual_effect"])


def test_a_worker_killed_from_outside_ends_the_command_with_a_clear_error_and_the_rows_kept(built):
    proc = start(built, "validate-loo", *LOO)
    kids = workers_started(proc)
    wait_for(lambda: rows(built) >= 1, 240, "the first finished retrain")
    os.kill(kids[0], signal.SIGKILL)  # what the kernel's out-of-memory killer does
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "Traceback" not in out, out
    assert "worker process ended abruptly" in " ".join(out.split()), out
    assert rows(built) >= 1  # the table still parses, finished rows in it


def test_ctrl_c_while_starting_up_ends_with_a_sentence_not_a_traceback(tmp_path):
    proc = start(tmp_path, "influence", "dataset=tiny")
    time.sleep(0.8)  # importing torch and composing the config: before any stage code runs
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in out, out
    assert "interrupted" in out


def every_file_parses(root: Path) -> None:
    """After any signal: every checkpoint and part loads with weights_only=True, every table and JSON file parses."""
    import json

    import torch

    for f in root.rglob("*"):
        if not f.is_file() or f.name.startswith("."):  # hidden: temporaries (removed by the next claim) and locks
            continue
        if f.suffix == ".pt":
            torch.load(f, map_location="cpu", weights_only=True)
        elif f.suffix == ".parquet":
            pd.read_parquet(f)
        elif f.suffix == ".csv":
            pd.read_csv(f)
        elif f.suffix == ".json":
            json.loads(f.read_text())


KILLED = {  # each long enough on tiny (a few seconds) to be caught in the middle, with many parts to resume from
    "pretrain": ["pretrain", "dataset=tiny", "train.pretrain.steps=4000"],
    "influence": ["influence", "dataset=tiny", "target.per_test=true", "target.max_points=24", "target.chunk=4",
                  "score.part_rows=30", "solver=exact", "score.method=jvp"],  # auto picks by timing: two separate
                  # runs may pick differently and differ at float rounding (a resumed run keeps its own pick)
    "validate-loo": ["validate-loo", *LOO[:-2], "loo.workers=1"],
}  # fmt: skip


def result_of(stage: str, root: Path):
    import torch

    if stage == "pretrain":
        (f,) = root.rglob("pretrain-*/checkpoint.pt")
        return torch.load(f, map_location="cpu", weights_only=True)["state"]
    if stage == "influence":
        (f,) = root.rglob("influence-*/scores.parquet")
        return pd.read_parquet(f)
    (f,) = root.rglob("loo.csv")
    return pd.read_csv(f).set_index("index").sort_index()[["actual_effect"]]


@pytest.mark.parametrize("stage", list(KILLED))
def test_seeded_kills_and_interrupts_leave_readable_files_and_the_rerun_ends_with_the_uninterrupted_result(
    stage, tmp_path
):
    import random

    import torch

    args = KILLED[stage]
    if stage != "pretrain":  # what the stage builds on is made once, uninterrupted, and copied to both roots
        base = start(tmp_path / "base", "influence" if stage == "validate-loo" else "finetune", "dataset=tiny")
        assert base.wait(timeout=300) == 0, base.stdout.read()
    for name in ("ref", "hit"):
        (tmp_path / name).mkdir()
        if (tmp_path / "base" / "out").exists():
            subprocess.run(["cp", "-r", str(tmp_path / "base" / "out"), str(tmp_path / name / "out")], check=True)
    t0 = time.monotonic()
    ref = start(tmp_path / "ref", *args)
    assert ref.wait(timeout=600) == 0, ref.stdout.read()
    length = time.monotonic() - t0
    rng = random.Random(f"kills-{stage}")  # seeded: the same moments on every run of the suite
    for i in range(10):
        proc = start(tmp_path / "hit", *args)
        time.sleep(rng.uniform(0.3, 1.1) * length)
        if proc.poll() is not None:  # it finished before the signal: nothing left to interrupt
            break
        proc.send_signal(signal.SIGKILL if i % 2 == 0 else signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
        assert "Traceback" not in out, out
        every_file_parses(tmp_path / "hit" / "out")
    final = start(tmp_path / "hit", *args)
    out, _ = final.communicate(timeout=600)
    assert final.returncode == 0, out
    want, got = result_of(stage, tmp_path / "ref" / "out"), result_of(stage, tmp_path / "hit" / "out")
    if stage == "pretrain":  # the trained weights, bit for bit

        def flat(d, prefix=""):
            out = {}
            for k, v in d.items():
                out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v}
            return out

        want, got = flat(want), flat(got)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    else:
        pd.testing.assert_frame_equal(got, want)
