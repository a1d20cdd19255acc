"""Every config file composes, names what it is for in its first line, and builds its network."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from msif.cli import STAGES
from msif.config import CONF_DIR, validate_config
from msif.models import build_finetune_net, build_pretrain_net, parameter_groups
from tests.helpers.configs import compose_cfg

CONF = Path(CONF_DIR)
ALL_YAML = sorted(CONF.rglob("*.yaml"))
PRIMARY = sorted(p.stem for p in CONF.glob("*.yaml") if p.stem != "msif")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_there_are_configs():
    assert {"digits", "mnist", "cifar", "tiny"} <= set(options("dataset"))
    assert {"fixed", "updated"} == set(options("case"))
    assert PRIMARY, "no primary configs"


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(CONF)))
def test_every_yaml_starts_with_a_comment_saying_what_it_is_for(path: Path):
    lines = path.read_text().splitlines()
    first = lines[1] if lines[0].strip() == "# @package _global_" else lines[0]
    assert first.startswith("# ") and len(first) > 30, f"{path} should start with a comment saying what it is for"


def composition_matrix() -> list:
    """Every (stage, data set, case, profile). Composing takes half a second, so the fast suite takes a covering
    subset: every stage with every data set, the (case, profile) pair turning with both, so that every data set meets
    every (case, profile) pair and every stage meets each pair too; the rest of the product is in the slow suite."""
    stages = [s for s, st in STAGES.items() if st.entry]
    pairs = [(c, p) for c in options("case") for p in ["cpu", "paper"]]
    params = []
    for i, stage in enumerate(stages):
        for j, dataset in enumerate(options("dataset")):
            covering = pairs[(i + j) % len(pairs)]
            for pair in pairs:
                marks = () if pair == covering else (pytest.mark.slow,)
                params.append(
                    pytest.param(stage, dataset, *pair, marks=marks, id=f"{stage}-{dataset}-{'-'.join(pair)}")
                )
    return params


@pytest.mark.parametrize("stage, dataset, case, profile", composition_matrix())
def test_every_stage_dataset_case_profile_composes_and_resolves(stage, dataset, case, profile):
    # `own` is the base of a user's own data (README): it names no network or recipe of its own, the user's
    # experiment config chooses them
    choices = ["model=digits", "train=digits"] if dataset == "own" else []
    cfg = compose_cfg(stage, [f"dataset={dataset}", f"case={case}", f"profile={profile}", *choices])
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert plain["dataset"]["name"] == dataset
    assert plain["case"]["name"] == case
    validate_config(cfg)  # and the composed config passes the schema (msif.schema) and the solver settings
    steps = plain["profile"]["train"][plain["train"]["name"]]
    assert plain["profile"]["name"] == profile
    assert plain["train"]["pretrain"]["steps"] == steps["pretrain"]
    assert plain["train"]["finetune"]["steps"] == steps["finetune"][case]


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes(experiment):
    cfg = compose_cfg("finetune", [f"experiment={experiment}"])
    OmegaConf.to_container(cfg, resolve=True)
    assert cfg.dataset.name == "cifar" and cfg.model.name == "cifar_cnn"


def test_paper_section_experiments_say_what_the_paper_did():
    a = compose_cfg("finetune", ["experiment=similarity_task_a"])
    b = compose_cfg("finetune", ["experiment=similarity_task_b"])
    d = compose_cfg("finetune", ["experiment=finetune_15k"])
    assert list(a.dataset.finetune.classes) == ["bird", "frog"] == list(a.dataset.pretrain.classes)
    assert list(b.dataset.finetune.classes) == ["automobile", "deer"]
    assert a.case.name == b.case.name == "fixed"
    assert d.case.name == "updated" and d.dataset.finetune.n_train == 15000
    c = compose_cfg("finetune", ["dataset=cifar", "case=updated"])
    assert d.train.finetune.steps == 3 * c.train.finetune.steps


INPUT_SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar": (3, 32, 32), "tiny": (10,)}
INPUT_SHAPES |= {"sentiment_rt": (34,), "sentiment_tweets": (34,), "text_tiny": (14,)}  # token ids per sentence


# the networks not tied to one data set, with the data set they are built for here
DATASET_OF = {"resnet8": "cifar", "torchvision": "cifar", "text_lstm": "text_tiny", "text_transformer": "text_tiny"}


@pytest.mark.parametrize("model", options("model"))
def test_every_model_builds_with_disjoint_parameter_groups_covering_both_networks(model):
    dataset = DATASET_OF.get(model, model)
    cfg = compose_cfg("finetune", [f"dataset={dataset}", f"model={model}"])
    shape = INPUT_SHAPES[dataset]
    pre = build_pretrain_net(cfg.model, shape, 4, seed=0)
    fin = build_finetune_net(cfg.model, pre.embedding, shape, 6, seed=0)
    groups = parameter_groups(pre, fin)
    ids = {name: {id(p) for p in g.values()} for name, g in groups.items()}
    assert set(ids) == {"W", "U", "Theta"}
    assert not (ids["W"] & ids["U"]) and not (ids["W"] & ids["Theta"]) and not (ids["U"] & ids["Theta"])
    assert ids["W"] | ids["U"] == {id(p) for p in pre.parameters()}
    assert ids["W"] | ids["Theta"] == {id(p) for p in fin.parameters()}
    assert all(len(g) > 0 for g in ids.values())


def test_table_a_networks_have_the_papers_shapes():
    import torch

    mnist = compose_cfg("pretrain", ["dataset=mnist"])
    net = build_pretrain_net(mnist.model, (1, 28, 28), 4, seed=0)
    convs = [m for m in net.embedding if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(32, (5, 5)), (64, (5, 5))]
    assert [type(m).__name__ for m in net.head] == ["Linear"] and net.head[0].in_features == 64 * 4 * 4
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 4)

    cifar = compose_cfg("pretrain", ["dataset=cifar"])
    net = build_pretrain_net(cifar.model, (3, 32, 32), 2, seed=0)
    convs = [m for m in net.embedding if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(32, (3, 3)), (64, (4, 4)), (128, (2, 2))]
    assert [type(m).__name__ for m in net.head] == ["Linear", "Tanh", "Linear"]
    assert net.head[0].out_features == 1500 and net.head[0].in_features == 128 * 6 * 6
    acts = {type(m).__name__ for m in net.embedding} - {"Conv2d", "MaxPool2d", "Flatten"}
    assert acts == {"Tanh"}
