"""A user's own data: an image folder, arrays and a torchvision class per stage, declared in a config folder of the
user's own (MSIF_CONFIG_DIR), run end to end; fingerprints that keep runs of other data or other code apart; and
the one-paragraph refusals for bad input, before any training."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from msif.config import pretrain_settings, signature
from msif.data import build_tasks
from msif.errors import MsifError
from tests.helpers.cli import msif, ok, refused
from tests.helpers.configs import compose_cfg


def write_images(root: Path, split_counts: dict[str, int], classes: list[str], size=(10, 12), seed=0) -> Path:
    """A generated <root>/<split>/<class>/*.png tree: grey blobs whose brightness depends on the class."""
    from PIL import Image

    gen = np.random.default_rng(seed)
    for split, count in split_counts.items():
        for k, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(gen.normal(40 + 50 * k, 30, size=size), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, mode="L").save(folder / f"{i:03d}.png")
    return root


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_kmnist(root: Path, n_train=60, n_test=30, seed=1) -> Path:
    """torchvision's KMNIST layout (<root>/KMNIST/raw/*-ubyte), written here: no download."""
    gen = np.random.default_rng(seed)
    raw = root / "KMNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        y = np.arange(n) % 10
        x = np.clip(gen.normal(20 * y[:, None, None], 40, size=(n, 28, 28)), 0, 255)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(x))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(y))
    return root


def experiment(folder: Path, name: str, dataset: str, model: str = "digits", train: str = "digits") -> Path:
    """An experiment config in the user's own config folder, as the README shows."""
    (folder / "experiment").mkdir(parents=True, exist_ok=True)
    text = f"""\
        # @package _global_
        # {name}: a test's own data
        defaults:
          - override /dataset: own
          - override /model: {model}
          - override /train: {train}
        dataset:
        """
    (folder / "experiment" / f"{name}.yaml").write_text(
        textwrap.dedent(text) + textwrap.indent(textwrap.dedent(dataset), "  ")
    )
    return folder


FAST = ["train.pretrain.steps=60", "train.finetune.steps=60"]


def test_pretrain_on_one_image_folder_finetune_on_another_end_to_end(env, tmp_path):
    pets = write_images(tmp_path / "pets", {"train": 12, "test": 5}, ["cat", "dog", "hen"])
    cars = write_images(tmp_path / "cars", {"train": 10, "test": 4}, ["bus", "van"], size=(14, 9), seed=3)
    conf = experiment(
        tmp_path / "conf",
        "mine",
        f"""\
        name: mine
        pretrain:
          source: {{kind: image_folder, root: {pets}, channels: 1, resize: 8, crop: 8}}
        finetune:
          source: {{kind: image_folder, root: {cars}, channels: 1, resize: 8, crop: 8}}
        """,
    )
    run = {"MSIF_CONFIG_DIR": str(conf)}
    out = ok(msif(["influence", "experiment=mine", *FAST], env=run))
    assert "mine classes ['cat', 'dog', 'hen'], m=36 examples" in out.stdout
    (scores,) = Path(env["MSIF_OUTPUTS"]).glob("mine/digits_cnn/pretrain-*/finetune-fixed-*/influence-*/scores.parquet")
    import pandas as pd

    table = pd.read_parquet(scores)
    assert len(table) == 36 and np.isfinite(table["score"]).all()
    ok(msif(["validate-loo", "experiment=mine", *FAST, "loo.k=2", "loo.bootstrap=20", "loo.repeats=1"], env=run))

    # the same data reached by another path (copied with times kept) is the same run; a rewritten image is not
    cfg = compose_cfg("pretrain", ["experiment=mine", *FAST], config_dir=conf)
    before = signature(pretrain_settings(cfg))
    write_images(pets, {"train": 1}, ["cat"], seed=9)  # rewrites train/cat/000.png
    assert signature(pretrain_settings(cfg)) != before


def test_arrays_for_pretraining_and_a_torchvision_class_for_finetuning(env, tmp_path):
    gen = np.random.default_rng(0)
    for split, n in (("train", 90), ("test", 30)):
        y = np.arange(n) % 3
        np.save(tmp_path / f"{split}_x.npy", (gen.normal(size=(n, 1, 8, 8)) + y[:, None, None, None]).astype("f4"))
        np.save(tmp_path / f"{split}_y.npy", y)
    kmnist = write_kmnist(tmp_path / "tv")
    conf = experiment(
        tmp_path / "conf",
        "mixed",
        f"""\
        name: mixed
        pretrain:
          source: {{kind: arrays, train: {{x: {tmp_path}/train_x.npy, y: {tmp_path}/train_y.npy}},
                   test: {{x: {tmp_path}/test_x.npy, y: {tmp_path}/test_y.npy}}, classes: [a, b, c]}}
        finetune:
          source: {{kind: torchvision, name: KMNIST, root: {kmnist}, resize: 8}}
          classes: [o, ki, su]
        """,
    )
    cfg = compose_cfg("finetune", ["experiment=mixed"], config_dir=conf)
    tasks = build_tasks(cfg.dataset, cfg.cache_dir)
    assert tasks.pretrain.train.class_names == ["a", "b", "c"] and len(tasks.pretrain.train) == 90
    assert tasks.finetune.train.class_names == ["o", "ki", "su"]  # KMNIST's own class names
    assert len(tasks.finetune.train) == 18 and tasks.input_shape == (1, 8, 8)
    # normalize: auto standardises each source by its own training split
    assert abs(float(tasks.pretrain.train.x.mean())) < 0.05
    ok(msif(["finetune", "experiment=mixed", *FAST], env={"MSIF_CONFIG_DIR": str(conf)}))


def test_a_change_of_the_users_network_code_makes_a_new_run(env, tmp_path, monkeypatch):
    module = tmp_path / "code" / "mynets.py"
    module.parent.mkdir()
    module.write_text(
        "import torch.nn as nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, in_shape):\n"
        "        super().__init__()\n"
        "        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh())\n"
        "    def forward(self, x):\n"
        "        return self.body(x)\n"
    )
    monkeypatch.syspath_prepend(str(module.parent))
    args = ["dataset=digits", "model.embedding._target_=mynets.Net", "~model.embedding.layers"]
    first = signature(pretrain_settings(compose_cfg("pretrain", args)))
    module.write_text(module.read_text().replace("nn.Tanh()", "nn.ReLU()"))
    assert signature(pretrain_settings(compose_cfg("pretrain", args))) != first
    sys.modules.pop("mynets", None)


@pytest.mark.parametrize(
    "make, needles",
    [
        ("empty_class", ["has no images"]),
        ("class_missing_in_test", ["lacks the class folders ['hen']"]),
        ("no_such_torchvision_class", ["torchvision.datasets has no data set class 'NoSuchSet'"]),
        ("torchvision_without_splits", ["takes neither `train=` nor `split=`"]),
        ("lengths_differ", ["has 30 inputs but 29 labels"]),
        ("float_labels", ["must be integer class indices"]),
        ("shapes_differ", ["one network cannot take both"]),
        ("unknown_option", ["has no option(s) ['colour']", "channels"]),
        ("missing_option", ["needs root"]),
    ],
)
def test_bad_own_data_is_refused_in_one_paragraph_before_training(make, needles, env, tmp_path):
    pets = write_images(tmp_path / "pets", {"train": 3, "test": 2}, ["cat", "dog", "hen"])
    images = f"{{kind: image_folder, root: {pets}, channels: 1, resize: 8, crop: 8}}"
    x, y = np.zeros((30, 1, 8, 8), "f4"), np.arange(30) % 2
    source = images
    if make == "empty_class":
        for p in (pets / "train" / "dog").iterdir():
            p.unlink()
    elif make == "class_missing_in_test":
        for p in (pets / "test" / "hen").iterdir():
            p.unlink()
        (pets / "test" / "hen").rmdir()
    elif make == "no_such_torchvision_class":
        source = f"{{kind: torchvision, name: NoSuchSet, root: {tmp_path}}}"
    elif make == "torchvision_without_splits":
        source = f"{{kind: torchvision, name: ImageFolder, root: {tmp_path}}}"
    elif make in ("lengths_differ", "float_labels", "shapes_differ"):
        if make == "lengths_differ":
            y = y[:29]
        if make == "float_labels":
            y = y + 0.5
        if make == "shapes_differ":
            x = np.zeros((30, 1, 9, 9), "f4")
        np.savez(tmp_path / "a.npz", x=x, y=y)
        source = f"{{kind: arrays, train: {tmp_path}/a.npz, test: {tmp_path}/a.npz}}"
    elif make == "unknown_option":
        source = f"{{kind: image_folder, root: {pets}, colour: 1}}"
    elif make == "missing_option":
        source = "{kind: image_folder}"
    conf = experiment(
        tmp_path / "conf", "bad", f"name: bad\npretrain: {{source: {images}}}\nfinetune: {{source: {source}}}\n"
    )
    result = msif(["pretrain", "experiment=bad", *FAST], env={"MSIF_CONFIG_DIR": str(conf)})
    refused(result, *needles)
    assert not list(Path(env["MSIF_OUTPUTS"]).rglob("*.pt")), "work started"


def test_own_dataset_without_a_source_and_a_missing_config_folder_are_refused(env, tmp_path):
    refused(msif(["pretrain", "dataset=own", "model=digits", "train=digits"]), "dataset.source")
    refused(msif(["pretrain", "dataset=digits"], env={"MSIF_CONFIG_DIR": str(tmp_path / "nowhere")}), "MSIF_CONFIG_DIR")


def test_torchvision_images_in_channels_last_arrays_come_out_channels_first():
    from msif.data.formats import torchvision_arrays

    class Fake:  # CIFAR-style: data (N, H, W, C) uint8, targets a list, classes
        data = np.zeros((4, 5, 6, 3), np.uint8)
        targets = [0, 1, 0, 1]
        classes = ["x", "y"]

    x, y, names, scale = torchvision_arrays(Fake(), "test")
    assert x.shape == (4, 3, 5, 6) and y.tolist() == [0, 1, 0, 1] and names == ["x", "y"] and scale == 1 / 255


def test_channel_statistics_match_numpy():
    from msif.data.sources import channel_statistics

    x = np.random.default_rng(0).integers(0, 256, size=(5000, 3, 4, 4)).astype(np.uint8)
    mean, std = channel_statistics(x, 1 / 255)
    ref = x.astype(np.float64).transpose(1, 0, 2, 3).reshape(3, -1) / 255
    assert np.allclose(mean, ref.mean(1)) and np.allclose(std, ref.std(1))


def test_missing_source_keys_in_a_spec_are_named():
    from omegaconf import OmegaConf

    from msif.data.sources import source_spec

    ds = OmegaConf.create({"name": "x", "source": {"kind": "arrays", "train": "a.npz"}, "pretrain": {}})
    with pytest.raises(MsifError, match="needs test"):
        source_spec(ds, "pretrain")


def _trained_elsewhere(tmp_path: Path, wrap: str):
    """Pretrain and finetune networks trained by a script of the user's own (not msif's fit), saved as state_dicts:
    plain, wrapped under 'state_dict', or with DDP's 'module.' prefix."""
    import torch
    import torch.nn.functional as F

    from msif.models import build_finetune_net, build_pretrain_net

    cfg = compose_cfg("finetune", ["dataset=tiny"])
    tasks = build_tasks(cfg.dataset, cfg.cache_dir)
    pre = build_pretrain_net(cfg.model, tasks.input_shape, tasks.pretrain.num_classes, seed=5)
    opt = torch.optim.SGD(pre.parameters(), lr=0.5)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(pre(tasks.pretrain.train.x), tasks.pretrain.train.y).backward()
        opt.step()
    fin = build_finetune_net(cfg.model, pre.embedding, tasks.input_shape, tasks.finetune.num_classes, seed=6)
    opt = torch.optim.SGD(fin.head.parameters(), lr=0.5)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(fin(tasks.finetune.train.x), tasks.finetune.train.y).backward()
        opt.step()
    files = []
    for name, net in (("pre", pre), ("fin", fin)):
        state = net.state_dict()
        if wrap == "module":
            state = {f"module.{k}": v for k, v in state.items()}
        payload = {"state_dict": state, "epoch": 3} if wrap == "state_dict" else state
        if wrap == "safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / f"{name}.safetensors")
            files.append(tmp_path / f"{name}.safetensors")
        else:
            torch.save(payload, tmp_path / f"{name}.pt")
            files.append(tmp_path / f"{name}.pt")
    return pre, fin, tasks, files


@pytest.mark.parametrize("wrap", ["state_dict", "module"])
def test_wrapped_and_ddp_prefixed_state_dicts_read_as_the_plain_one(wrap, tmp_path):
    from msif.runs import read_weights

    pre, _, _, (pre_file, _) = _trained_elsewhere(tmp_path, wrap)
    state = read_weights(pre_file, {})
    assert state.keys() == pre.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in pre.state_dict().items())


@pytest.mark.parametrize("wrap", ["plain", "safetensors"])
def test_networks_trained_elsewhere_are_scored_from_the_command_line(wrap, env, tmp_path):
    import pandas as pd

    from msif.influence import MultiStageInfluence

    pre, fin, tasks, (pre_file, fin_file) = _trained_elsewhere(tmp_path, wrap)
    args = ["dataset=tiny", f"weights.pretrain={pre_file}", f"weights.finetune={fin_file}"]
    out = ok(msif(["influence", *args]))
    assert f"weights from {pre_file}" in out.stdout
    (scores,) = Path(env["MSIF_OUTPUTS"]).rglob("scores.parquet")
    table = pd.read_parquet(scores).sort_values("index")
    # the same nets through the Python API, with the command's solver settings
    cfg = compose_cfg("influence", args)
    from msif.config import solver_group

    api = MultiStageInfluence(
        pre, fin, (tasks.pretrain.train.x, tasks.pretrain.train.y), (tasks.finetune.train.x, tasks.finetune.train.y),
        case="fixed", solver=solver_group(cfg), hessian_sample=None,
    )  # fmt: skip
    from msif.config import response_solvers

    api.solver = response_solvers(cfg, solver_group(cfg), len(tasks.pretrain.train))
    expected = api.influence(tasks.finetune.test.x, tasks.finetune.test.y).numpy()
    assert np.corrcoef(table["score"].to_numpy(), expected)[0, 1] > 0.9999
    if wrap == "plain":
        ok(msif(["validate-loo", *args, "loo.k=2", "loo.bootstrap=20", "loo.repeats=1"]))


def test_weights_that_do_not_fit_are_refused_with_the_keys_listed(env, tmp_path):
    import torch

    _, _, _, (pre_file, _) = _trained_elsewhere(tmp_path, "plain")
    state = torch.load(pre_file, weights_only=True)
    renamed = {k.replace("embedding.", "features."): v for k, v in state.items()}
    torch.save(renamed, tmp_path / "renamed.pt")
    refused(msif(["pretrain", "dataset=tiny", f"weights.pretrain={tmp_path / 'renamed.pt'}"]), "missing", "unexpected")
    ok(
        msif(
            [
                "pretrain",
                "dataset=tiny",
                f"weights.pretrain={tmp_path / 'renamed.pt'}",
                "weights.rename={features:embedding}",
            ]
        )
    )
    refused(
        msif(["pretrain", "dataset=tiny", "model.embedding.hidden=[5]", f"weights.pretrain={pre_file}"]), "mis-shaped"
    )
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled.pt")
    refused(msif(["pretrain", "dataset=tiny", f"weights.pretrain={tmp_path / 'pickled.pt'}"]), "weights only")
    refused(msif(["pretrain", "dataset=tiny", f"weights.pretrain={tmp_path / 'nowhere.pt'}"]), "does not exist")
    assert not list(Path(env["MSIF_OUTPUTS"]).rglob("pretrain-*/checkpoint.pt"))[1:], (
        "only the renamed import was saved"
    )


def test_tracking_part_of_the_embedding_from_the_command_line(env):
    """embedding_params tracks the globbed part of W (a run of its own, the rest named as held fixed); a glob that
    names nothing is refused before any training."""
    bad = refused(msif(["influence", "dataset=digits", *FAST, "embedding_params=[embedding.9.*]"]))
    assert "embedding_params=['embedding.9.*'] does not fit model=digits" in bad.stdout + bad.stderr
    assert not list(Path(env["MSIF_OUTPUTS"]).glob("**/pretrain-*/checkpoint.pt"))
    part = ok(msif(["influence", "dataset=digits", *FAST, "embedding_params=[embedding.2.*]"]))
    assert "2 parameter tensors of the embedding are held fixed" in part.stdout
    whole = ok(msif(["influence", "dataset=digits", *FAST]))
    import json

    summaries = [
        json.loads(f.read_text())
        for f in Path(env["MSIF_OUTPUTS"]).glob("digits/*/pretrain-*/finetune-fixed-*/influence-*/summary.json")
    ]
    assert "held fixed" not in whole.stdout and len(summaries) == 2
    (tracked,) = [s for s in summaries if s["embedding_held_fixed"]]
    assert tracked["embedding_held_fixed"] == ["embedding.0.weight", "embedding.0.bias"]
    assert tracked["parameters"]["W"] == 32 * 16 * 9 + 32


def test_a_copied_data_folder_keeps_its_fingerprint_and_an_edited_one_does_not(tmp_path, monkeypatch):
    """A data folder copied again (new modification times, same bytes) names the same runs, so hours of finished
    runs are reused; a file rewritten at the same size (e.g. relabelled) names new ones."""
    import os

    from msif.data import formats
    from msif.data.sources import fingerprint

    monkeypatch.setenv("MSIF_CACHE", str(tmp_path / "cache"))
    root = write_kmnist(tmp_path / "a")
    spec = {"kind": "torchvision", "name": "KMNIST", "root": str(root)}
    before = fingerprint(spec)
    for f in (root / "KMNIST" / "raw").iterdir():
        os.utime(f, ns=(1, 10**18))  # as a fresh copy would have them
    formats._TREE_KEYS.clear()  # a new command
    assert fingerprint(spec) == before
    assert (tmp_path / "cache" / "fingerprints.json").is_file()  # the next command reads the memo, not the bytes
    labels = root / "KMNIST" / "raw" / "train-labels-idx1-ubyte"
    data = bytearray(labels.read_bytes())
    data[-1] = (data[-1] + 1) % 10
    labels.write_bytes(bytes(data))
    formats._TREE_KEYS.clear()
    assert fingerprint(spec) != before
