"""`msif influence` end to end: the table, summary and pictures it writes, reuse, and its refusals."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from msif.stages import influence
from tests.helpers.cli import msif, ok, refused
from tests.helpers.configs import compose_cfg

TINY = ["dataset=tiny", "dtype=float64"]


def only(root, pattern):
    (path,) = list(root.rglob(pattern))
    return path


@pytest.mark.parametrize("case", ["fixed", "updated"])
def test_influence_writes_the_table_summary_and_histogram(case, env, tmp_path, prebuilt):
    prebuilt("pretrain", TINY)  # the pretrained model only: the finetune run is made first, and says so
    proc = ok(msif(["influence", *TINY, f"case={case}", "output.csv=true"]))
    assert "running `msif finetune` first" in proc.stdout and "most harmful" in proc.stdout
    run = only(tmp_path / "outputs", "summary.json").parent
    assert run.parent.name.startswith(f"finetune-{case}-") and run.name.startswith("influence-")
    frame = pd.read_parquet(run / "scores.parquet")
    m = 180  # tiny: 3 classes x 60 training examples
    assert list(frame.columns) == [
        "index",
        "source_index",
        "label",
        "class_name",
        "score",
        "predicted_removal_effect",
        "rank",
    ]
    assert len(frame) == m and sorted(frame["index"]) == list(range(m))
    assert (frame["predicted_removal_effect"] == -frame["score"] / m).all()
    assert frame.loc[frame["score"].idxmax(), "rank"] == 1 and sorted(frame["rank"]) == list(range(1, m + 1))
    assert frame["score"].notna().all() and frame["score"].abs().sum() > 0
    assert pd.read_csv(run / "scores.csv").shape == frame.shape
    summary = json.loads((run / "summary.json").read_text())
    assert summary["m"] == m and summary["case"] == case and summary["target"]["size"] == 90
    assert {"gradients", "ihvp1", "mixed_term", "ihvp2", "scoring", "total"} <= set(summary["seconds"])
    assert [s["label"] for s in summary["solves"]] == ["finetune", "pretrain"]
    assert all(s["residual"] < 1e-4 for s in summary["solves"])
    assert summary["parameters"] == {"W": 88, "U": 27, "Theta": 27}
    assert (run / "score_histogram.png").stat().st_size > 1000
    again = ok(msif(["influence", *TINY, f"case={case}"]))
    assert "reusing" in again.stdout


def test_digits_per_test_point_table_and_picture_grid(env, tmp_path):
    ok(
        msif(
            [
                "influence",
                "dataset=digits",
                "target.kind=misclassified",
                "target.per_test=true",
                "target.max_points=3",
                "train.pretrain.steps=60",
                "train.finetune.steps=60",
            ]
        )
    )
    run = only(tmp_path / "outputs", "summary.json").parent
    frame = pd.read_parquet(run / "scores.parquet")
    assert frame["test_index"].nunique() == 3 and len(frame) == 3 * 541
    assert list(frame.columns[:5]) == [
        "test_index",
        "test_source_index",
        "test_label",
        "test_class_name",
        "test_prediction",
    ]
    assert (frame["test_prediction"] != frame["test_class_name"]).all()  # misclassified targets
    assert (frame.groupby("test_index")["rank"].min() == 1).all()
    assert (run / "influence_grid.png").stat().st_size > 5000


def test_per_test_scores_sum_to_the_summed_target_through_the_stage(env, prebuilt):
    prebuilt("finetune", TINY)
    common = [*TINY, "solver=exact", "target.kind=indices", "target.indices=[0,3,7,11]"]
    summed = influence(compose_cfg("influence", common)).scores
    per = influence(compose_cfg("influence", [*common, "target.per_test=true", "target.chunk=3"])).scores
    total = per.groupby("index")["score"].sum().sort_index().to_numpy()
    assert abs(total - summed.sort_values("index")["score"].to_numpy()).max() < 1e-9 * abs(total).max()


def test_a_subset_of_pretraining_examples_is_scored_with_the_same_numbers(env, prebuilt):
    prebuilt("finetune", TINY)
    full = influence(compose_cfg("influence", [*TINY, "solver=exact"])).scores.set_index("index")
    part = influence(compose_cfg("influence", [*TINY, "solver=exact", "score.indices=[5,0,99]"])).scores
    assert list(part["index"]) == [5, 0, 99]
    assert abs(part.set_index("index")["score"] - full.loc[[5, 0, 99], "score"]).max() < 1e-12


@pytest.mark.parametrize(
    "args, needles",
    [
        (["upstream.auto=false"], ["no pretrain checkpoint", "msif pretrain"]),
        (["score.indices=[0,5000]"], ["5000", "not rows of the pretraining set"]),
        (["target.kind=indices", "target.indices=[-1]"], ["not rows of the finetune test set"]),
        (["solver=nope"], ["Could not find 'solver/nope'", "cg_normal"]),
        (["solver.pretrain.method=newton"], ["Unknown IHVP solver 'newton'", "cg_normal"]),
        (["solver=exact", "solver.pretrain.max_params=50"], ["exact solver would form", "max_params=50"]),
        (["target.kind=everything"], ["target.kind=everything is not one of its options", "misclassified"]),
    ],
)
def test_bad_influence_input_is_refused_clearly(args, needles, env, tmp_path, prebuilt):
    if "upstream.auto=false" not in args:  # that one is about the missing upstream runs
        prebuilt("finetune", TINY)
    refused(msif(["influence", *TINY, *args]), *needles)
    assert not list((tmp_path / "outputs").rglob("summary.json"))


def test_an_unconverged_solve_is_an_error_not_a_table(env, tmp_path, prebuilt):
    prebuilt("finetune", TINY)
    refused(
        msif(
            [
                "influence",
                *TINY,
                "solver=cg",
                "solver.pretrain.iterations=1",
                "solver.pretrain.damping=0",
                "solver.pretrain.max_residual=1e-3",
            ]
        ),
        "did not converge",
        "relative residual",
    )
    assert not list((tmp_path / "outputs").rglob("scores.parquet"))


def test_influence_without_a_finetune_checkpoint_and_auto_upstream_off(env, tmp_path, prebuilt):
    prebuilt("pretrain", TINY)
    refused(msif(["influence", *TINY, "upstream.auto=false"]), "no finetune checkpoint", "msif finetune")


@pytest.mark.parametrize("per_test", [False, True])
def test_an_interrupted_run_resumes_from_its_saved_parts_and_ends_with_the_same_table(
    env, tmp_path, monkeypatch, prebuilt, per_test
):
    import shutil

    prebuilt("finetune", TINY)
    overrides = [*TINY, "score.part_rows=32", "target.chunk=4", f"target.per_test={str(per_test).lower()}"]
    if per_test:
        overrides += ["target.kind=indices", "target.indices=[0,3,5,8,13,21]"]
    reference = influence(compose_cfg("influence", overrides))
    table = reference.scores.copy()
    shutil.rmtree(reference.path)

    from msif.influence.api import MultiStageInfluence

    calls = {"score": 0}

    original = MultiStageInfluence.score

    def interrupted(self, S, indices=None):
        calls["score"] += 1
        if calls["score"] == 3:  # the third part: the run dies with two parts (and every solve) saved
            raise KeyboardInterrupt
        return original(self, S, indices)

    monkeypatch.setattr(MultiStageInfluence, "score", interrupted)
    with pytest.raises(KeyboardInterrupt):
        influence(compose_cfg("influence", overrides))
    partial = reference.path / "partial"
    assert len(list(partial.glob("scores-*.pt"))) == 2 and not (reference.path / "summary.json").exists()
    assert len(list(partial.glob("targets-*.pt"))) == (2 if per_test else 1)
    chosen = json.loads((partial / "score_method.json").read_text())["method"]  # measured once, kept for the rest
    assert chosen in ("jvp", "per_example")

    solved = {"n": 0}
    original_targets = MultiStageInfluence.target_vectors

    def counted(self, *args, **kwargs):
        solved["n"] += 1
        return original_targets(self, *args, **kwargs)

    monkeypatch.setattr(MultiStageInfluence, "target_vectors", counted)
    calls["score"] = -100  # no more interruptions
    resumed = influence(compose_cfg("influence", overrides))
    assert solved["n"] == 0  # the saved solves are reused
    assert calls["score"] == -100 + (len(table) // (6 if per_test else 1) + 31) // 32 - 2  # only the missing parts
    pd.testing.assert_frame_equal(resumed.scores, table)
    assert not partial.exists()
    assert len(resumed.summary["solves"]) == len(reference.summary["solves"])
    assert resumed.summary["scoring"]["method"] == chosen
    # this run's timings hold no solve: the earlier run's solve time is reported apart, not added in
    assert resumed.summary["seconds"].get("ihvp2", 0.0) == 0.0 and resumed.summary["seconds_reused"]["ihvp2"] > 0


def test_a_resumed_run_with_other_blocks_or_parts_or_a_damaged_part_still_gives_the_uninterrupted_table(
    env, tmp_path, monkeypatch, prebuilt
):
    """Saved parts record what they hold: a rerun with another target.chunk or score.part_rows, or a truncated part,
    recomputes what does not fit instead of mislabelling or dropping rows; force=true starts from nothing."""
    import shutil

    from msif.influence.api import MultiStageInfluence

    prebuilt("finetune", TINY)
    base = [*TINY, "target.per_test=true", "target.kind=indices", "target.indices=[0,3,5,8,13,21,34]"]
    original = MultiStageInfluence.score
    calls = {"n": 0}

    def interrupted(self, S, indices=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, S, indices)

    first = ["target.chunk=2", "score.part_rows=32"]
    for second in (
        ["target.chunk=3", "score.part_rows=32"],  # other target blocks
        ["target.chunk=2", "score.part_rows=50"],  # other score parts
        ["target.chunk=2", "score.part_rows=32", "truncate"],  # a damaged block and part
        ["target.chunk=1", "score.part_rows=20", "force=true"],  # force: nothing reused
    ):
        settings = [o for o in second if o not in ("truncate", "force=true")]
        uninterrupted = influence(compose_cfg("influence", [*base, *settings, "force=true"]))
        table = uninterrupted.scores.copy()
        partial = uninterrupted.path / "partial"
        shutil.rmtree(uninterrupted.path)
        calls["n"] = 0
        monkeypatch.setattr(MultiStageInfluence, "score", interrupted)
        with pytest.raises(KeyboardInterrupt):
            influence(compose_cfg("influence", [*base, *first]))
        assert list(partial.glob("scores-*.pt")) and list(partial.glob("targets-*.pt"))
        if "truncate" in second:
            for f in [*partial.glob("scores-*.pt")][:1] + [*partial.glob("targets-*.pt")][:1]:
                f.write_bytes(f.read_bytes()[:100])
        monkeypatch.setattr(MultiStageInfluence, "score", original)
        resumed = influence(compose_cfg("influence", [*base, *[o for o in second if o != "truncate"]]))
        pd.testing.assert_frame_equal(resumed.scores, table)
        assert not partial.exists()


def test_lowrank_curvature_is_fitted_once_and_reused_by_later_runs(env, tmp_path, prebuilt):
    """solver=lowrank caches the Ritz pairs next to each checkpoint; another target reuses them (no refit), and at
    full rank the table equals the exact solve of the same filter."""
    prebuilt("finetune", [*TINY, "case=updated"])
    lowrank = ["solver=lowrank", "solver.pretrain.rank=200", "solver.finetune.rank=200"]
    ok(msif(["influence", *TINY, "case=updated", *lowrank]))
    files = sorted((tmp_path / "outputs").rglob("curvature/ritz-*.pt"))
    assert len(files) == 2  # the pretrain Hessian's (pretrain run) and the finetune Hessian's (finetune run)
    stamps = [f.stat().st_mtime_ns for f in files]
    again = ok(msif(["influence", *TINY, "case=updated", *lowrank, "target.kind=indices", "target.indices=[0,3]"]))
    assert again.stdout.count("reusing") >= 2 and [f.stat().st_mtime_ns for f in files] == stamps
    # lowrank applies the damped inverse (it cannot apply the retrain response): its dense ground truth does too
    exact = ["solver=exact", "solver.pretrain.normal=true", "solver.finetune.normal=true", "response.kind=inverse"]
    ours = influence(compose_cfg("influence", [*TINY, "case=updated", *lowrank])).scores.set_index("index")["score"]
    dense = influence(compose_cfg("influence", [*TINY, "case=updated", *exact])).scores.set_index("index")["score"]
    assert (ours - dense).abs().max() < 1e-8 * dense.abs().max()


def test_a_damaged_score_table_is_refused_on_reuse_and_recomputed_with_force(env, tmp_path, prebuilt):
    prebuilt("finetune", TINY)
    first = influence(compose_cfg("influence", TINY))
    table = first.scores.copy()
    path = first.path / "scores.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    refused(msif(["influence", *TINY]), "is corrupt", "SHA-256", "force=true")
    path.write_bytes(b"not a parquet file")
    refused(msif(["influence", *TINY]), "scores.parquet", "force=true")
    ok(msif(["influence", *TINY, "force=true"]))
    pd.testing.assert_frame_equal(influence(compose_cfg("influence", TINY)).scores, table)


def test_per_test_lowrank_scores_the_examples_against_the_basis_with_the_same_numbers(
    env, prebuilt, monkeypatch, capsys
):
    """Per-test targets solved by lowrank (s = C U, fewer basis vectors U than the 90 test points) are scored against
    U and combined by C: the table equals the one that scores every target's s, from fewer scoring directions."""
    import importlib

    from msif.influence.api import MultiStageInfluence

    stage = importlib.import_module("msif.stages.influence")

    prebuilt("finetune", TINY)
    lowrank = ["solver=lowrank", "solver.pretrain.rank=5", "solver.pretrain.block=6", "solver.pretrain.steps=3"]
    overrides = [*TINY, *lowrank, "solver.finetune.rank=200", "target.per_test=true", "response.kind=inverse"]
    directions, original = [], MultiStageInfluence.score

    def counting(self, S, indices=None):
        directions.append(len(S))
        return original(self, S, indices)

    monkeypatch.setattr(MultiStageInfluence, "score", counting)
    through_basis = influence(compose_cfg("influence", overrides)).scores
    assert "through the solve's" in capsys.readouterr().out
    assert max(directions) <= 5 + (6 + 1) * 3 < 90  # rank + (block + 1) × steps
    directions.clear()
    monkeypatch.setattr(stage, "factored", lambda S, report: None)
    every_target = influence(compose_cfg("influence", [*overrides, "force=true"])).scores
    assert min(directions) == 90 and through_basis["test_index"].nunique() == 90
    scale = every_target["score"].abs().max()
    assert (through_basis["score"] - every_target["score"]).abs().max() < 1e-10 * scale
    pd.testing.assert_frame_equal(through_basis, every_target, rtol=1e-8, atol=1e-12 * scale)  # ranks, effects, ...
