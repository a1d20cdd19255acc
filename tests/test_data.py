"""Pretraining / finetuning splits: relabelling, subsample sizes, stable indices, and the errors for bad input."""

from __future__ import annotations

import pytest
import torch

from msif.data import build_tasks, load_source
from msif.errors import MsifError
from tests.helpers.configs import SHARED_DATA, compose_cfg


def tasks_for(dataset: str, *overrides: str):
    cfg = compose_cfg("finetune", [f"dataset={dataset}", *overrides])
    return cfg, build_tasks(cfg.dataset, cfg.cache_dir)


@pytest.mark.parametrize("dataset", ["tiny", "digits"])
def test_classes_are_relabelled_in_config_order_and_indices_are_stable(dataset, env):
    cfg, tasks = tasks_for(dataset)
    source = load_source(cfg.dataset)
    for task, spec in ((tasks.pretrain, cfg.dataset.pretrain.classes), (tasks.finetune, cfg.dataset.finetune.classes)):
        for part, (ys) in ((task.train, source.y_train), (task.test, source.y_test)):
            assert part.y.min() == 0 and part.y.max() == len(spec) - 1
            # label k of the task is source class spec[k], row by row
            assert torch.equal(ys[part.source_index], torch.tensor(list(spec))[part.y])
            assert torch.all(part.source_index[1:] > part.source_index[:-1]), "rows must be in source order"
    # every training example of the pretraining classes is in the pretraining set, exactly once
    pre_classes = torch.tensor(list(cfg.dataset.pretrain.classes))
    expected = torch.nonzero(torch.isin(source.y_train, pre_classes)).flatten()
    assert torch.equal(tasks.pretrain.train.source_index, expected)
    _, again = tasks_for(dataset)
    assert torch.equal(again.pretrain.train.x, tasks.pretrain.train.x)
    assert torch.equal(again.finetune.train.source_index, tasks.finetune.train.source_index)


def test_finetune_subsample_has_the_configured_size_is_seeded_and_independent_of_the_training_seed(env):
    _, a = tasks_for("digits", "dataset.finetune.n_train=300")
    _, b = tasks_for("digits", "dataset.finetune.n_train=300", "seed=7")
    _, c = tasks_for("digits", "dataset.finetune.n_train=300", "dataset.finetune.subsample_seed=1")
    assert len(a.finetune.train) == 300
    assert torch.equal(a.finetune.train.source_index, b.finetune.train.source_index)
    assert not torch.equal(a.finetune.train.source_index, c.finetune.train.source_index)
    assert len(a.pretrain.train) == 541  # digits 0-3 among the first 1,347 rows


def test_class_names_work_like_indices(env):
    _, by_index = tasks_for("digits")
    _, by_name = tasks_for("digits", "dataset.pretrain.classes=['0','1','2','3']")
    assert torch.equal(by_index.pretrain.train.source_index, by_name.pretrain.train.source_index)


@pytest.mark.parametrize(
    "override, message",
    [
        ("dataset.pretrain.classes=[]", "is empty"),
        ("dataset.pretrain.classes=[0,11]", "not a class of this data set"),
        ("dataset.finetune.classes=[4,4,5]", "more than once"),
        ("dataset.finetune.classes=[cat,dog]", "not a class of this data set"),
        ("dataset.finetune.n_train=5000", "asks for more examples"),
        ("dataset.finetune.n_test=0", "positive integer"),
    ],
)
def test_bad_class_lists_and_subsample_sizes_are_refused_clearly(override, message, env):
    with pytest.raises(MsifError, match=message) as err:
        tasks_for("digits", override)
    assert "\n" not in err.value.message.strip() or len(err.value.message) < 600


def test_missing_mnist_names_the_folder_and_what_to_put_there(env, tmp_path):
    with pytest.raises(MsifError) as err:
        tasks_for("mnist", "dataset.download=false")
    text = err.value.message
    assert str(tmp_path / "data") in text and "MNIST/raw" in text and "MSIF_DATA" in text


def _idx(tensor) -> bytes:
    """An IDX file of unsigned bytes, written independently of msif's reader (the format's spec)."""
    header = bytes([0, 0, 0x08, tensor.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in tensor.shape)
    return header + tensor.numpy().astype("uint8").tobytes()


def test_mnist_idx_files_load_plain_or_gzipped_and_a_cut_file_is_refused(env, tmp_path):
    import gzip

    from msif.data.sources import read_idx

    g = torch.Generator().manual_seed(0)
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    split = {}
    for prefix, n in (("train", 60), ("t10k", 30)):
        images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        labels = torch.arange(n, dtype=torch.uint8) % 10
        (raw / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images)))  # as distributed
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(labels))  # as unpacked
        split[prefix] = (images, labels)
    _, tasks = tasks_for("mnist", "dataset.download=false", "dataset.finetune.n_train=10")
    digits03 = split["train"][1] < 4
    assert torch.equal(tasks.pretrain.train.y, split["train"][1][digits03].long())
    assert torch.equal(tasks.pretrain.train.source_index, torch.nonzero(digits03).flatten())
    cut = raw / "t10k-labels-idx1-ubyte"
    cut.write_bytes(cut.read_bytes()[:-3])
    with pytest.raises(MsifError, match="cut off or damaged"):
        read_idx(cut)


def test_missing_cifar_names_both_layouts(env, tmp_path):
    with pytest.raises(MsifError) as err:
        tasks_for("cifar", "dataset.download=false")
    assert "cifar-10-batches-py" in err.value.message and "cifar10/{train,test}/<class>/*.jpg" in err.value.message


def _fake_cifar_tree(root, classes, per_class=3):
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for c in classes:
            d = root / "cifar10" / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (32, 32, 3), generator=gen, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(d / f"{i}.jpg")


def test_cifar_image_folder_is_decoded_once_then_read_from_the_cache(env, tmp_path, monkeypatch):
    from msif.data import formats, sources

    classes = sources.CIFAR10_CLASSES
    _fake_cifar_tree(tmp_path / "data", classes)
    cfg, tasks = tasks_for("cifar", "dataset.finetune.n_train=null", "dataset.download=false")
    assert len(tasks.pretrain.train) == 6 and tasks.pretrain.train.class_names == ["bird", "frog"]
    assert len(tasks.finetune.test) == 8 * 3 and tasks.input_shape == (3, 32, 32)
    assert list((tmp_path / "cache").glob("images-*.pt")), "decoded tensors should be cached"

    def no_decoding(*args):
        raise AssertionError("the second load should not decode JPEGs")

    monkeypatch.setattr(formats, "decode_images", no_decoding)
    _, again = tasks_for("cifar", "dataset.finetune.n_train=null", "dataset.download=false")
    assert torch.equal(again.pretrain.train.x, tasks.pretrain.train.x)


def test_cifar_image_folder_with_missing_classes_is_refused(env, tmp_path):
    _fake_cifar_tree(tmp_path / "data", ["airplane", "bird", "frog"])
    with pytest.raises(MsifError, match="lacks the class folders") as err:
        tasks_for("cifar", "dataset.download=false")
    assert "automobile" in err.value.message


@pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").is_dir(), reason="no shared MNIST copy beside the checkout")
def test_real_mnist_splits_match_the_paper(monkeypatch, env):
    monkeypatch.setenv("MSIF_DATA", str(SHARED_DATA))
    _, tasks = tasks_for("mnist", "dataset.download=false")
    assert len(tasks.pretrain.train) == 24754  # every MNIST training image of digits 0-3
    assert len(tasks.finetune.train) == 5000
    assert len(tasks.finetune.test) == 10000 - 4157 and len(tasks.pretrain.test) == 4157
    assert tasks.pretrain.train.x.shape[1:] == (1, 28, 28)
    from torchvision.datasets import MNIST

    from msif.data.sources import read_idx

    theirs = MNIST(str(SHARED_DATA), train=False, download=False)  # torchvision's own reader, as a cross-check
    ours = read_idx(SHARED_DATA / "MNIST" / "raw" / "t10k-images-idx3-ubyte")
    assert torch.equal(ours, theirs.data)
