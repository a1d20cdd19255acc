"""The stage lifecycle (msif.lifecycle) on a stage that trains nothing: reuse, force, config.yaml, upstream.auto,
explicit upstream folders, the per-command cache, and resumable result tables."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from msif import lifecycle
from msif.errors import MsifError
from msif.io import atomic_write_json
from msif.lifecycle import Context, ResumableRows, Stage, need, run
from msif.stages.reproduce import compose_stage


class Counting(Stage):
    """A stage whose result is its seed; it counts how often it computed."""

    name = "pretrain"
    marker = "done.json"

    def __init__(self):
        self.computed = 0

    def settings(self, cfg, up):
        return {"seed": cfg.seed}

    def location(self, cfg, up, signature):
        return Path(cfg.output_root) / f"toy-{signature}"

    def compute(self, cfg, ctx, up, folder):
        self.computed += 1
        assert (folder.path / "config.yaml").exists(), "config.yaml is written before the computation starts"
        atomic_write_json({"seed": cfg.seed}, folder.path / self.marker)
        return cfg.seed

    def load(self, cfg, ctx, up, folder, path=None):
        return json.loads(((path.parent if path else folder.path) / self.marker).read_text())["seed"]


def config(tmp_path, *overrides):
    return compose_stage("pretrain", ["dataset=tiny", f"output_root={tmp_path}", *overrides])


def test_a_finished_run_is_reused_until_forced_and_other_settings_get_their_own_folder(tmp_path, capsys):
    stage = Counting()
    assert run(stage, config(tmp_path)) == 0 and stage.computed == 1
    assert run(stage, config(tmp_path)) == 0 and stage.computed == 1
    assert "reusing the finished run" in capsys.readouterr().out
    assert run(stage, config(tmp_path, "force=true")) == 0 and stage.computed == 2
    assert run(stage, config(tmp_path, "seed=3")) == 3 and stage.computed == 3
    assert len(list(tmp_path.glob("toy-*"))) == 2


def test_need_loads_makes_or_refuses_as_upstream_says(tmp_path, capsys):
    stage = Counting()
    with pytest.raises(MsifError, match="upstream.auto=false"):
        need(stage, config(tmp_path, "upstream.auto=false"), Context(config(tmp_path)))
    assert stage.computed == 0 and not list(tmp_path.glob("toy-*/done.json"))
    ctx = Context(config(tmp_path))
    assert need(stage, config(tmp_path), ctx) == 0 and stage.computed == 1
    assert "running `msif pretrain` first" in capsys.readouterr().out
    assert need(stage, config(tmp_path), ctx) == 0 and stage.computed == 1  # the command's cache
    assert need(stage, config(tmp_path), Context(config(tmp_path))) == 0 and stage.computed == 1  # from disk
    with pytest.raises(MsifError, match="does not exist"):
        need(stage, config(tmp_path, f"upstream.pretrain={tmp_path / 'elsewhere'}"), Context(config(tmp_path)))


def test_a_context_loads_each_data_set_once(tmp_path, monkeypatch):
    calls = []
    real = lifecycle.build_tasks
    monkeypatch.setattr(lifecycle, "build_tasks", lambda *a: calls.append(a) or real(*a))
    ctx = Context(config(tmp_path))
    first = ctx.tasks(config(tmp_path))
    assert ctx.tasks(config(tmp_path, "seed=5")) is first  # the data do not depend on the seed
    ctx.tasks(config(tmp_path, "dataset.finetune.n_train=60"))
    assert len(calls) == 2


COLUMNS = ["index", "score", "seconds"]


def test_resumable_rows_continue_a_table_and_refuse_one_that_is_not_whole(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("index,score,seconds\n")  # interrupted before its first row
    table = ResumableRows(csv, COLUMNS, key=["index"], numeric=["index", "score"])
    assert table.done == 0 and (3,) not in table
    table.append({"index": 3, "score": 0.5, "seconds": 1.0})
    table.append({"index": 7, "score": -1.5, "seconds": 2.0})
    again = ResumableRows(csv, COLUMNS, key=["index"], numeric=["index", "score"])
    assert again.done == 2 and (3,) in again and (7,) in again
    assert again.frame().equals(pd.DataFrame({"index": [3, 7], "score": [0.5, -1.5], "seconds": [1.0, 2.0]}))

    csv.write_text("index,score,seconds\n3,0.5,1.0\n7,-1.")  # the last append cut off: that row is done again
    cut = ResumableRows(csv, COLUMNS, key=["index"], numeric=["index", "score"])
    assert cut.done == 1 and (3,) in cut and (7,) not in cut
    assert csv.read_text() == "index,score,seconds\n3,0.5,1.0\n"

    for text, match in [
        ("index,score,seconds\n3,0.5,1.0\n3,0.7,1.0\n", "repeats a row"),
        ("index,score,seconds\n3,abc,1.0\n", "non-numeric"),
        ("index,value,seconds\n3,0.5,1.0\n", "columns"),
    ]:
        csv.write_text(text)
        with pytest.raises(MsifError, match=match):
            ResumableRows(csv, COLUMNS, key=["index"], numeric=["index", "score"])
        assert csv.read_text() == text, "a refused table is kept as it is"
    csv.write_text("index,score,seconds\n99,0.5,1.0\n")
    with pytest.raises(MsifError, match="not this run's"):
        ResumableRows(csv, COLUMNS, ["index"], ["index"], valid=lambda f: "holds rows not this run's")


def test_a_run_folder_in_use_is_refused_with_its_owner_and_a_stale_lock_is_taken_over(tmp_path):
    import subprocess
    import sys

    from msif.locks import LOCK

    stage = Counting()
    cfg = config(tmp_path)
    folder = stage.folder(cfg, None).path
    folder.mkdir(parents=True)
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (folder / LOCK).write_text(json.dumps({"pid": owner.pid, "host": socket.gethostname(), "since": "then"}))
        with pytest.raises(MsifError, match=rf"in use by PID {owner.pid}.*delete {folder / LOCK}"):
            run(stage, cfg)
        assert stage.computed == 0 and not (folder / stage.marker).exists()
    finally:
        owner.kill()
        owner.wait()
    leftover = folder / ".checkpoint.pt.k2j4.tmp"  # what a writer killed mid-write leaves behind
    leftover.write_bytes(b"half")
    assert run(stage, cfg) == 0 and stage.computed == 1  # its owner is gone: stale, taken over
    assert not (folder / LOCK).exists()  # released when the stage ends
    assert not leftover.exists()
    (folder / LOCK).write_text("{cut off")  # a claim interrupted mid-write is stale too
    assert run(stage, config(tmp_path, "force=true")) == 0 and stage.computed == 2


def test_a_stage_that_fails_releases_its_folder(tmp_path):
    from msif.locks import LOCK

    class Failing(Counting):
        def compute(self, cfg, ctx, up, folder):
            raise RuntimeError("boom")

    stage = Failing()
    cfg = config(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        run(stage, cfg)
    assert not (stage.folder(cfg, None).path / LOCK).exists()


@pytest.mark.slow
def test_two_identical_commands_started_together_train_once_and_both_end_cleanly(tmp_path):
    import os
    import subprocess
    import sys

    import torch

    env = os.environ | {
        "MSIF_OUTPUTS": str(tmp_path / "out"),
        "MSIF_CACHE": str(tmp_path / "c"),
        "OMP_NUM_THREADS": "1",
    }
    args = [sys.executable, "-m", "msif", "pretrain", "dataset=tiny", "train.pretrain.steps=2000"]
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in "ab"]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all("Traceback" not in o for o in outs), outs
    assert sorted(p.returncode for p in procs) in ([0, 0], [0, 2]), outs
    # one trains; the other is refused with the owner named, or (had the first finished already) reuses its run
    others = [o for o in outs if "is in use by PID" in o or "reusing the finished run" in o]
    assert len(others) == 1, outs
    (checkpoint,) = (tmp_path / "out").rglob("checkpoint.pt")
    torch.load(checkpoint, weights_only=True)
    assert not list((tmp_path / "out").rglob(".lock"))
