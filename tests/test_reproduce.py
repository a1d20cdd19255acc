"""`msif reproduce`: the tiny plan runs every kind of experiment end to end and writes a complete report."""

from __future__ import annotations

import re

import pytest
from PIL import Image

from msif.errors import MsifError
from msif.stages.reproduce import compose_stage, reproduce
from tests.helpers.cli import msif, refused


@pytest.mark.parametrize(
    "only",
    # one experiment of every kind but cleansing (its retrains are tested in test_cleanse.py), and the whole plan;
    # both slow (40-70 s here): the fast suite checks that every plan composes and validates
    [
        pytest.param(["fig2a", "fig3", "fig4", "fig5", "lds", "faults", "table1"], marks=pytest.mark.slow),
        pytest.param(None, marks=pytest.mark.slow),
    ],
    ids=["every-kind", "whole-plan"],
)
def test_the_tiny_plan_makes_every_figure_and_the_report_table(only, env, tmp_path):
    cfg = compose_stage("reproduce", ["plan=tiny", f"report_dir={tmp_path / 'report'}", f"only={only or 'null'}"])
    # the cleansing retrains with one torch thread each, not all cores (see conftest.py: small nets, shared cores)
    (cleansing,) = [e for e in cfg.plan.experiments if e.kind == "cleanse"]
    cleansing.overrides.append("cleanse.threads=1")
    path = reproduce(cfg)
    text = path.read_text()
    ids = [e.id for e in cfg.plan.experiments if only is None or e.id in only]
    lines = text.splitlines()
    start = lines.index("| experiment | paper | msif | settings | compute (s) | this run (s) |") + 2
    rows = lines[start : lines.index("", start)]  # the report's table (Table 1's own tables come later)
    assert len(rows) == len(ids) == (10 if only is None else len(only))
    for row in rows:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]]
        assert len(cells) == 6 and all(cells), row  # title, paper, msif, settings, compute, this run
        assert float(cells[4].replace(",", "")) > 0
    figures = sorted((tmp_path / "report" / "figures").glob("*.png"))
    assert {f.stem.split("_")[0] for f in figures} >= set(ids) - {"table1"}  # Table 1 is a table, not a figure
    assert "### test sentence #0" in text and "largest \\|I\\|" in text
    for f in figures:
        with Image.open(f) as im:
            assert im.size[0] > 100 and im.size[1] > 100
        assert f"(figures/{f.name})" in text
    assert "Section 4.5 at the paper's size" in text and "not reproduced" in text
    assert re.search(r"Total compute of the distinct runs behind this report: [\d,]+ s", text)
    # the validation table: one row per data set and case, filled by the leave-one-out, LDS and faults runs
    start = lines.index("## Validation table") + 2
    header = [c.strip() for c in lines[start].split("|")[1:-1]]
    fixed = [c.strip() for c in re.split(r"(?<!\\)\|", next(x for x in lines[start:] if "digits, fixed" in x))[1:-1]]
    cell = dict(zip(header, fixed, strict=True))
    assert re.match(r"(-?\d\.\d\d|nan) \[.*\(k = 4\)", cell["leave-one-out r [95% CI]"])
    assert re.match(r"(-?\d\.\d\d|nan); [+-]", cell["identity r; msif − identity [95% CI]"])
    assert re.match(r"-?\d\.\d\d \[.*\(6 subsets\)", cell["LDS [95% CI]"])
    assert re.match(r"\d+\.\d%; \d+\.\d%", cell["planted faults in the top 10%: by score magnitude; by pretrain loss"])
    assert float(cell["this run (s)"].replace(",", "")) > 0


def test_the_validation_table_merges_the_experiments_of_one_data_set_and_case():
    from msif.report import Entry, validation_table

    def entry(wall, cells):
        return Entry("x", "t", "p", "m", "s", 1.0, [], [], wall=wall, validation=cells)

    lines = validation_table(
        [
            entry(4.0, {"MNIST, fixed": {"loo": "0.97 [0.93, 0.99] (k = 20)"}}),
            entry(0.5, {"MNIST, fixed": {"identity": "0.86; +0.12 [+0.06, +0.24]"}}),
            entry(20.0, {"CIFAR-10, fixed": {"lds": "0.53 [0.23, 0.76] (20 subsets)"}}),
            entry(99.0, None),  # a figure that is not part of the table
        ]
    )
    assert lines[0] == "## Validation table"
    columns = ["leave-one-out r [95% CI]", "identity r; msif − identity [95% CI]", "LDS [95% CI]"]
    assert lines[2] == "| data set, case | " + " | ".join(columns) + " | this run (s) |"
    assert lines[4] == "| MNIST, fixed | 0.97 [0.93, 0.99] (k = 20) | 0.86; +0.12 [+0.06, +0.24] | – | 4.5 |"
    assert lines[5] == "| CIFAR-10, fixed | – | – | 0.53 [0.23, 0.76] (20 subsets) | 20 |"
    assert validation_table([entry(1.0, None)]) == []
    with pytest.raises(ValueError, match="not columns"):
        validation_table([entry(1.0, {"MNIST, fixed": {"leave-one-out r": "0.97"}})])


def test_unknown_experiments_and_bad_plan_overrides_are_refused(env, tmp_path):
    with pytest.raises(MsifError, match="fig9"):
        reproduce(compose_stage("reproduce", ["plan=tiny", "only=[fig9]", f"report_dir={tmp_path}"]))
    bad = compose_stage("reproduce", ["plan=tiny", "only=[fig4]", f"report_dir={tmp_path}"])
    bad.plan.experiments[3].runs[0].append("no_such_key=1")
    with pytest.raises(MsifError, match="do not compose"):
        reproduce(bad)
    refused(msif(["reproduce", "plan=nope"]), "plan")


@pytest.mark.parametrize(
    "experiment, case, classes, n_train",
    [
        ("similarity_task_a", "fixed", ["bird", "frog"], 5000),
        ("similarity_task_b", "fixed", ["automobile", "deer"], 5000),
        ("finetune_15k", "updated", None, 15000),
    ],
)
def test_the_study_configs_compose_for_every_stage(experiment, case, classes, n_train):
    base = compose_stage("influence", ["dataset=cifar", f"case={case}"])
    for stage in ("finetune", "influence", "validate-loo", "cleanse"):
        cfg = compose_stage(stage, [f"experiment={experiment}"])
        assert cfg.dataset.name == "cifar" and cfg.case.name == case
        assert list(cfg.dataset.pretrain.classes) == ["bird", "frog"]  # one pretrained model for both tasks
        assert list(cfg.dataset.finetune.classes) == (classes or list(base.dataset.finetune.classes))
        assert cfg.dataset.finetune.n_train == n_train
        expected_steps = base.train.finetune.steps * (3 if experiment == "finetune_15k" else 1)
        assert cfg.train.finetune.steps == expected_steps
        assert cfg.train.pretrain == base.train.pretrain


@pytest.mark.parametrize("plan", ["cpu", "full", "paper", "tiny"])
def test_every_experiment_of_every_plan_composes_and_validates(plan):
    from msif.config import validate_config
    from msif.stages.reproduce import HANDLERS

    cfg = compose_stage("reproduce", [f"plan={plan}"])
    stages = {"loo": "validate-loo", "identity": "validate-loo", "per_test": "influence", "histograms": "influence"}
    stages |= {"lds": "validate-lds", "faults": "planted-faults"}
    ids = {e.id for e in cfg.plan.experiments}
    # plan cpu is the 2-hour selection: what it leaves out it must name, pointing to plan full
    every = {"fig2a", "fig2c", "fig3", "fig4", "fig5", "fig6", "cleanse"}
    assert ids >= every or (plan == "cpu" and "plan=full" in " ".join(cfg.plan.not_reproduced.values()))
    for e in cfg.plan.experiments:
        assert e.kind in HANDLERS
        runs = e.runs.values() if e.kind == "histograms" else e.runs if e.kind == "per_test" else [e.overrides]
        for overrides in runs:
            run = compose_stage(
                stages.get(e.kind, "cleanse"), [f"profile={cfg.plan.profile}", *cfg.plan.common, *overrides]
            )
            validate_config(run)
            assert run.profile.name == cfg.plan.profile
