"""Data sources: where each stage's examples come from, checked, loaded and fingerprinted.

A source is named per stage (`dataset.pretrain.source`, `dataset.finetune.source`; default: `dataset.source`) by a
*spec*: a built-in name (`digits`, `tiny`, `mnist`, `cifar10`, read with the data set's `root`, `download` and
`normalize`), or a mapping with a `kind` and that kind's options (`SOURCE_KINDS`):

    source: {kind: image_folder, root: ~/data/pets, resize: 32, crop: 32}
    source: {kind: torchvision, name: KMNIST, root: ~/data}
    source: {kind: arrays, train: train.npz, test: test.npz}
    source: {kind: text, train: corpus.txt}                  # sentences, one per line: a language-model task
    source: {kind: labelled_text, train: reviews.tsv}        # label<TAB>text lines: a classification task

`load_source` returns whole train and test splits with class names; images are kept as uint8 (N, C, H, W) plus a
scale to [0, 1], and tasks.py selects, scales and normalises rows. `fingerprint` identifies the data a spec reads
(file names, sizes and times; the content of array files), so a run is never reused for other data. Nothing here
downloads unless the spec says `download: true` and the network allows it.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from msif.config import to_plain
from msif.data import formats
from msif.errors import MsifError
from msif.io import atomic_torch_save, load_tensors

log = logging.getLogger(__name__)

DIGITS_FILE = Path(__file__).parent / "digits.csv.gz"
DIGITS_N_TRAIN = 1347  # the first 1,347 rows train, the last 450 test (fixed, no shuffling)
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class Source:
    """A data set's full train and test splits. `x_*` are uint8 or float tensors (or a memory-mapped numpy array);
    multiply by `scale` to get [0, 1]. `normalize` is the (mean, std) per channel applied after scaling, or None."""

    name: str
    class_names: list[str]
    x_train: Any
    y_train: torch.Tensor
    x_test: Any
    y_test: torch.Tensor
    scale: float = 1.0
    normalize: tuple[list[float], list[float]] | None = None
    text: bool = False  # x_* are lists of sentences (tasks.py encodes them with the pretraining vocabulary)
    language_model: bool = False  # unlabelled sentences: the task is next-token prediction

    @property
    def input_shape(self) -> tuple[int, ...]:
        return () if self.text else tuple(self.x_train.shape[1:])


BUILTIN = ("digits", "tiny", "mnist", "cifar10", "tiny_corpus", "tiny_reviews")
REQUIRED = object()
SOURCE_KINDS: dict[str, dict[str, Any]] = {  # each kind's options and their defaults
    "image_folder": {"root": REQUIRED, "train": "train", "test": "test", "classes": None, "channels": 3,
                     "resize": None, "crop": None, "normalize": "auto"},
    "torchvision": {"name": REQUIRED, "root": REQUIRED, "download": False, "args": {}, "channels": None,
                    "resize": None, "crop": None, "normalize": "auto"},
    "arrays": {"train": REQUIRED, "test": REQUIRED, "classes": None, "scale": None, "normalize": "auto"},
    "text": {"train": REQUIRED, "test": None, "test_fraction": 0.05, "split_seed": 0},
    "labelled_text": {"train": REQUIRED, "test": None, "test_fraction": 0.25, "split_seed": 0, "classes": None},
}  # fmt: skip
PATH_KEYS = ("root", "train", "test")  # where the data are, not what they are: the fingerprint covers them


def source_spec(ds: Any, stage: str | None = None) -> dict[str, Any]:
    """The checked, complete spec of the source `stage` ("pretrain", "finetune"; None: the data set's default) reads."""
    spec, where = (ds[stage].get("source"), f"dataset.{stage}.source") if stage else (None, "")
    if spec is None:
        spec, where = ds.get("source"), "dataset.source"
    if spec in (None, ""):
        raise MsifError(
            f"No data source for the {stage or 'data set'}: dataset.source is not set"
            + (f", nor dataset.{stage}.source." if stage else "."),
            "Set dataset.source (both stages) or a source per stage in your experiment config, e.g. "
            "dataset.source: {kind: image_folder, root: <folder>} (README, 'Your own data').",
        )
    spec = to_plain(spec)
    if isinstance(spec, str):
        if spec not in BUILTIN:
            raise MsifError(
                f"{where}={spec!r} is not a data source msif knows.",
                f"Use one of the built-in {', '.join(BUILTIN)}, or a mapping with kind: "
                f"{' | '.join(SOURCE_KINDS)} (README, 'Your own data').",
            )
        out = {"kind": spec, "root": ds.get("root"), "download": bool(ds.get("download", False))}
        out["normalize"] = to_plain(ds.get("normalize"))
        if spec == "tiny":
            out["generator"] = to_plain(ds.get("generator"))
        return out
    if not isinstance(spec, dict) or spec.get("kind") not in SOURCE_KINDS:
        got = spec.get("kind") if isinstance(spec, dict) else spec
        raise MsifError(
            f"{where} must be a built-in name ({', '.join(BUILTIN)}) or a mapping whose kind is one of "
            f"{', '.join(SOURCE_KINDS)}; got {got!r}.",
            f"Write e.g. {where}: {{kind: image_folder, root: <folder>}}.",
        )
    options = SOURCE_KINDS[spec["kind"]]
    unknown = sorted(set(spec) - set(options) - {"kind"})
    if unknown:
        raise MsifError(
            f"{where} (kind {spec['kind']}) has no option(s) {unknown}.",
            f"Its options are: {', '.join(options)}.",
        )
    out = {"kind": spec["kind"]} | {k: spec.get(k, v) for k, v in options.items()}
    missing = [k for k, v in out.items() if v is REQUIRED or (options.get(k) is REQUIRED and v in (None, ""))]
    if missing:
        raise MsifError(f"{where} (kind {spec['kind']}) needs {', '.join(missing)}.", _EXAMPLES[spec["kind"]])
    _check_options(out, where)
    out["where"] = where
    return out


_EXAMPLES = {
    "image_folder": "e.g. {kind: image_folder, root: ~/data/pets} for ~/data/pets/{train,test}/<class>/*.png.",
    "torchvision": "e.g. {kind: torchvision, name: KMNIST, root: ~/data}.",
    "arrays": "e.g. {kind: arrays, train: train.npz, test: test.npz}, each holding x and y.",
    "text": "e.g. {kind: text, train: corpus.txt}, one sentence per line (a test file, or test_fraction).",
    "labelled_text": "e.g. {kind: labelled_text, train: reviews.tsv}, one label<TAB>text per line.",
}


def _check_options(spec: dict, where: str) -> None:
    def positive_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    if "channels" in spec and spec["channels"] not in (None, 1, 3):
        raise MsifError(f"{where}.channels={spec['channels']!r}: use 1 (grey), 3 (colour) or null (as stored).", None)
    if spec.get("resize") is not None and not positive_int(spec["resize"]):
        raise MsifError(f"{where}.resize={spec['resize']!r}: the shorter side in pixels, e.g. 32, or null.", None)
    crop = spec.get("crop")
    if crop is not None and not (
        positive_int(crop) or (isinstance(crop, list) and len(crop) == 2 and all(map(positive_int, crop)))
    ):
        raise MsifError(f"{where}.crop={crop!r}: a centre crop of n or [height, width] pixels, or null.", None)
    norm = spec.get("normalize")
    if not (norm in (None, "auto") or (isinstance(norm, dict) and set(norm) == {"mean", "std"})):
        raise MsifError(
            f"{where}.normalize={norm!r}: use auto (mean and std per channel of the training split), null (none) or "
            "{mean: [...], std: [...]} (one per channel, after scaling to [0, 1]).",
            None,
        )
    if spec.get("scale") is not None and not (isinstance(spec["scale"], (int, float)) and spec["scale"] > 0):
        raise MsifError(f"{where}.scale={spec['scale']!r}: a positive factor, or null (1/255 for uint8 x, else 1).")


def load_source(spec: Any, cache_dir: str | None = None) -> Source:
    """The whole train and test splits a source spec reads (a data set config: its default source)."""
    if not (isinstance(spec, dict) and "kind" in spec):
        spec = source_spec(spec)
    loaders = {
        "digits": _load_digits,
        "tiny": _load_tiny,
        "mnist": _load_mnist,
        "cifar10": _load_cifar10,
        "image_folder": _load_image_folder,
        "torchvision": _load_torchvision,
        "arrays": _load_arrays,
        "text": _load_text,
        "labelled_text": _load_text,
        "tiny_corpus": _load_tiny_text,
        "tiny_reviews": _load_tiny_text,
    }
    source = loaders[spec["kind"]](spec, cache_dir)
    norm = spec.get("normalize")
    if source.text:
        return source
    if norm == "auto":
        source.normalize = channel_statistics(source.x_train, source.scale)
    elif norm is not None:
        source.normalize = ([float(v) for v in norm["mean"]], [float(v) for v in norm["std"]])
    return source


def channel_statistics(x: Any, scale: float) -> tuple[list[float], list[float]]:
    """Mean and standard deviation per channel (dimension 1) of `x · scale`, in float64 over blocks of rows (a
    memory map is read once); a constant channel gets std 1."""
    c = x.shape[1]
    total, squares, count = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64), 0
    for start in range(0, len(x), 4096):
        rows = x[start : start + 4096]
        block = (rows if torch.is_tensor(rows) else torch.from_numpy(np.array(rows))).to(torch.float64) * scale
        flat = block.transpose(0, 1).reshape(c, -1)
        total += flat.sum(1)
        squares += (flat * flat).sum(1)
        count += flat.shape[1]
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt()
    std[std < 1e-12] = 1.0
    return mean.tolist(), std.tolist()


def _load_digits(spec: dict, cache_dir: str | None) -> Source:
    with gzip.open(DIGITS_FILE, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    x = torch.from_numpy(table[:, :64]).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(table[:, 64]).long()
    n = DIGITS_N_TRAIN
    return Source("digits", [str(i) for i in range(10)], x[:n], y[:n], x[n:], y[n:], scale=1 / 16)


def _load_tiny(spec: dict, cache_dir: str | None) -> Source:
    """Gaussian classes around seeded random centres; the same config always gives the same points."""
    g = OmegaConf.create(spec["generator"])
    gen = torch.Generator().manual_seed(int(g.seed))
    centres = torch.randn(g.n_classes, g.dim, generator=gen, dtype=torch.float64) * 2.0

    def draw(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(g.n_classes).repeat_interleave(per_class)
        x = centres[y] + g.spread * torch.randn(len(y), g.dim, generator=gen, dtype=torch.float64)
        return x.float(), y

    x_train, y_train = draw(int(g.train_per_class))
    x_test, y_test = draw(int(g.test_per_class))
    return Source("tiny", [str(i) for i in range(g.n_classes)], x_train, y_train, x_test, y_test)


def _missing_data(what: str, looked_in: Path, put_there: str) -> MsifError:
    return MsifError(
        f"{what} was not found in {looked_in.resolve()} and could not be downloaded.",
        f"{put_there} Set the data folder with the MSIF_DATA environment variable or data_root=<folder> "
        "(dataset.root for this data set only).",
    )


def _data_root(spec: dict) -> Path:
    if not spec.get("root"):
        raise MsifError(
            f"The {spec['kind']} data set has no data folder (dataset.root is empty).",
            "Set MSIF_DATA or data_root=<folder>.",
        )
    return Path(os.path.expanduser(str(spec["root"])))


MNIST_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> torch.Tensor:
    """An IDX file (MNIST's format: magic 0x0000 08 <ndim>, big-endian int32 sizes, then uint8 data), plain or
    gzip-compressed (read by its magic bytes, whatever the file is called)."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise MsifError(
            f"{path} is not an IDX file of unsigned bytes (MNIST's format).",
            "Replace it with the original MNIST file (plain or .gz).",
        )
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    start, count = 4 + 4 * ndim, math.prod(dims)
    if len(raw) - start != count:
        raise MsifError(
            f"{path} holds {len(raw) - start:,} bytes of data where its header promises {count:,} ({dims}): the file "
            "is cut off or damaged.",
            "Replace it with the original MNIST file.",
        )
    return torch.frombuffer(bytearray(raw[start:]), dtype=torch.uint8).reshape(dims)


def _mnist_files(raw: Path, train: bool) -> tuple[Path, Path] | None:
    """The split's image and label files in `raw`, each plain or .gz; None when either is missing."""
    found = []
    for name in MNIST_FILES[train]:
        path = next((p for p in (raw / name, raw / f"{name}.gz") if p.is_file()), None)
        if path is None:
            return None
        found.append(path)
    return found[0], found[1]


def _load_mnist(spec: dict, cache_dir: str | None) -> Source:
    root = _data_root(spec)
    raw = root / "MNIST" / "raw"
    splits = {}
    for train in (True, False):
        files = _mnist_files(raw, train)
        if files is None:
            if not spec["download"]:
                raise _missing_data(
                    "MNIST",
                    raw,
                    "Put the four IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                    "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each plain or .gz) in "
                    "<data folder>/MNIST/raw/, or allow dataset.download=true on a machine with "
                    "internet.",
                )
            try:
                from torchvision.datasets import MNIST

                MNIST(str(root), train=train, download=True)
            except Exception:  # noqa: BLE001 - any network/IO failure means the same thing to the user
                raise _missing_data(
                    "MNIST",
                    raw,
                    "Put the four MNIST IDX files in <data folder>/MNIST/raw/ (torchvision's "
                    "layout), or run once on a machine with internet.",
                ) from None
            files = _mnist_files(raw, train)
            if files is None:
                raise _missing_data("MNIST", raw, "The download did not leave the four IDX files there.")
        images, labels = (read_idx(f) for f in files)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise MsifError(
                f"The MNIST files in {raw} do not fit together: images {tuple(images.shape)}, labels "
                f"{tuple(labels.shape)}.",
                "Replace them with the original four MNIST files.",
            )
        splits[train] = (images, labels)
    (x_tr, y_tr), (x_te, y_te) = splits[True], splits[False]
    return Source(
        "mnist",
        [str(i) for i in range(10)],
        x_tr.unsqueeze(1),
        y_tr.long(),
        x_te.unsqueeze(1),
        y_te.long(),
        scale=1 / 255,
    )


def _load_cifar10(spec: dict, cache_dir: str | None) -> Source:
    root = _data_root(spec)
    if (root / "cifar-10-batches-py").is_dir():
        return _cifar10_torchvision(root, download=False)
    if (root / "cifar10").is_dir():
        return _cifar10_image_folder(root / "cifar10", cache_dir)
    if spec["download"]:
        try:
            return _cifar10_torchvision(root, download=True)
        except Exception:  # noqa: BLE001
            pass
    raise _missing_data(
        "CIFAR-10",
        root,
        "Put either torchvision's cifar-10-batches-py/ folder there, or an image-folder tree "
        "cifar10/{train,test}/<class>/*.jpg (e.g. `tar -xzf cifar10-jpeg.tar.gz -C <data folder>`).",
    )


def _cifar10_torchvision(root: Path, download: bool) -> Source:
    from torchvision.datasets import CIFAR10

    tr = CIFAR10(str(root), train=True, download=download)
    te = CIFAR10(str(root), train=False, download=download)

    def to_tensor(d: CIFAR10) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(d.targets).long()

    return Source("cifar10", list(tr.classes), *to_tensor(tr), *to_tensor(te), scale=1 / 255)


def _cifar10_image_folder(folder: Path, cache_dir: str | None) -> Source:
    """cifar10/{train,test}/<class>/*.jpg: an image folder with CIFAR-10's ten classes, all required."""
    spec = SOURCE_KINDS["image_folder"] | {"kind": "image_folder", "root": str(folder), "classes": CIFAR10_CLASSES}
    source = _load_image_folder(spec | {"where": "the CIFAR-10 image folder"}, cache_dir)
    source.name = "cifar10"
    return source


def _load_image_folder(spec: dict, cache_dir: str | None) -> Source:
    """<root>/<train>/<class>/<images> and <root>/<test>/..., decoded once and cached as uint8 tensors keyed by the
    file list (names, sizes, times) and the decoding options."""
    where = spec.get("where", "dataset.source")
    root = Path(os.path.expanduser(str(spec["root"])))
    names, files = formats.image_folder_files(
        root, {"train": spec["train"], "test": spec["test"]}, spec.get("classes"), where
    )
    options = f"{spec['channels']}/{spec['resize']}/{spec['crop']}"
    key = formats.listing_key([p for split in ("train", "test") for p, _ in files[split]], options + str(names))
    cache = _cache_folder(cache_dir) / f"images-{key[:16]}.pt"
    tensors = load_tensors(cache) if cache.exists() else None
    if tensors is None:
        tensors = {}
        for split in ("train", "test"):
            paths = [p for p, _ in files[split]]
            tensors[f"x_{split}"] = formats.decode_images(paths, spec["channels"], spec["resize"], spec["crop"], where)
            tensors[f"y_{split}"] = torch.tensor([label for _, label in files[split]], dtype=torch.long)
        _save_cache(tensors, cache)
    return Source(
        root.name, names, tensors["x_train"], tensors["y_train"], tensors["x_test"], tensors["y_test"], scale=1 / 255
    )


def _load_torchvision(spec: dict, cache_dir: str | None) -> Source:
    """A torchvision.datasets class by name, over files already in its layout (or downloaded when allowed)."""
    where = spec.get("where", "dataset.source")
    cls = formats.torchvision_class(spec["name"], where)
    root = Path(os.path.expanduser(str(spec["root"])))
    splits = {}
    for train in (True, False):
        data = formats.torchvision_split(cls, root, train, bool(spec["download"]), dict(spec["args"] or {}), where)
        x, y, names, scale = formats.torchvision_arrays(data, where)
        if x.dtype == torch.uint8 and x.dim() == 4:
            x = formats.image_tensors(x, spec["channels"], spec["resize"], spec["crop"], where)
        splits[train] = (x, y, names, scale)
    (x_tr, y_tr, names, scale), (x_te, y_te, _, _) = splits[True], splits[False]
    k = int(max(y_tr.max(), y_te.max())) + 1
    names = names if names and len(names) >= k else [str(i) for i in range(k)]
    return Source(str(spec["name"]), names, x_tr, y_tr, x_te, y_te, scale=scale)


TINY_WORDS = {
    "noun": ["film", "story", "actor", "plot", "music", "scene", "ending", "cast", "script", "camera"],
    "verb": ["was", "felt", "seemed", "looked", "became", "stayed"],
    "adverb": ["very", "quite", "truly", "rather", "so", "really"],
    "good": ["good", "great", "fine", "lovely", "superb", "moving", "funny", "clever"],
    "bad": ["bad", "dull", "awful", "weak", "boring", "silly", "flat", "tired"],
    "filler": ["and", "but", "then", "the", "a", "of", "in", "with", "this", "that"],
}


def _load_tiny_text(spec: dict, cache_dir: str | None) -> Source:
    """Generated sentences (no files): `tiny_corpus`, 480 unlabelled sentences of a small grammar (a language model's
    corpus), or `tiny_reviews`, 240 + 120 reviews whose adjectives say their polarity. For tests and a first run."""
    rng = np.random.default_rng(7 if spec["kind"] == "tiny_corpus" else 11)
    w = TINY_WORDS

    def pick(key: str) -> str:
        return str(rng.choice(w[key]))

    def sentence(polarity: str | None) -> str:
        tone = polarity or str(rng.choice(["good", "bad"]))
        words = ["the", pick("noun"), pick("verb"), pick("adverb"), pick(tone)]
        if rng.random() < 0.6:
            words += [pick("filler"), "the", pick("noun"), pick("verb"), pick(tone)]
        return " ".join(words) + " ."

    if spec["kind"] == "tiny_corpus":
        rows = [sentence(None) for _ in range(480)]
        train, test = rows[:400], rows[400:]
        zeros = torch.zeros
        return Source("tiny_corpus", ["sentence"], train, zeros(400, dtype=torch.long), test,
                      zeros(80, dtype=torch.long), text=True, language_model=True)  # fmt: skip
    labels = rng.integers(0, 2, 360)
    rows = [sentence("good" if y else "bad") for y in labels]
    y = torch.as_tensor(labels, dtype=torch.long)
    return Source("tiny_reviews", ["negative", "positive"], rows[:240], y[:240], rows[240:], y[240:], text=True)


def _load_text(spec: dict, cache_dir: str | None) -> Source:
    """Sentences (kind text: a language-model task) or labelled sentences (labelled_text), train and test; without
    a test file, a seeded test_fraction of the train file."""
    from msif.data import text

    labelled = spec["kind"] == "labelled_text"

    def read(path) -> list[tuple[str, str]]:
        path = Path(os.path.expanduser(str(path)))
        return text.read_labelled(path) if labelled else [("", s) for s in text.read_sentences(path)]

    train = read(spec["train"])
    if spec.get("test"):
        test = read(spec["test"])
    else:
        fraction = float(spec["test_fraction"])
        if not 0 < fraction < 1:
            raise MsifError(f"{spec.get('where')}.test_fraction={fraction}: use a share in (0, 1), e.g. 0.1.", None)
        gen = torch.Generator().manual_seed(int(spec["split_seed"]))
        order = torch.randperm(len(train), generator=gen).tolist()
        cut = max(1, int(round(fraction * len(train))))
        held = set(order[:cut])
        test = [row for i, row in enumerate(train) if i in held]
        train = [row for i, row in enumerate(train) if i not in held]
    if labelled:
        names = [str(c) for c in (spec.get("classes") or sorted({label for label, _ in train}))]
        index = {c: i for i, c in enumerate(names)}
        unknown = sorted({label for label, _ in [*train, *test]} - set(index))
        if unknown:
            raise MsifError(
                f"{spec.get('where')}: the labels {unknown[:5]} are not among the classes {names}.",
                "List every label in the source's classes, or leave classes null (the labels of the train file).",
            )
        y_tr = torch.tensor([index[label] for label, _ in train], dtype=torch.long)
        y_te = torch.tensor([index[label] for label, _ in test], dtype=torch.long)
    else:
        names = ["sentence"]
        y_tr, y_te = torch.zeros(len(train), dtype=torch.long), torch.zeros(len(test), dtype=torch.long)
    return Source(
        Path(str(spec["train"])).stem,
        names,
        [s for _, s in train],
        y_tr,
        [s for _, s in test],
        y_te,
        text=True,
        language_model=not labelled,
    )


def _load_arrays(spec: dict, cache_dir: str | None) -> Source:
    """x and y per split from .npz / .pt / .npy files; class names from the spec, the files, or 0..k-1."""
    where = spec.get("where", "dataset.source")
    x_tr, y_tr, names_tr = formats.read_arrays(spec["train"], f"{where}.train")
    x_te, y_te, names_te = formats.read_arrays(spec["test"], f"{where}.test")
    if tuple(x_tr.shape[1:]) != tuple(x_te.shape[1:]):
        raise MsifError(
            f"{where}: the train inputs have shape {tuple(x_tr.shape[1:])} per example, the test inputs "
            f"{tuple(x_te.shape[1:])}.",
            "Both splits need inputs of one shape.",
        )
    k = int(max(y_tr.max(), y_te.max())) + 1
    names = spec.get("classes") or names_tr or names_te or [str(i) for i in range(k)]
    if len(names) < k:
        raise MsifError(
            f"{where}: the labels go up to {k - 1} but only {len(names)} class names are given ({names}).",
            "Give one name per class index 0..k-1, or leave the names out.",
        )
    dtype = getattr(x_tr, "dtype", None)
    scale = spec.get("scale") or (1 / 255 if dtype in (np.uint8, torch.uint8) else 1.0)
    name = Path(str(spec["train"] if not isinstance(spec["train"], dict) else spec["train"]["x"])).stem
    return Source(name, [str(n) for n in names], x_tr, y_tr, x_te, y_te, scale=float(scale))


def _save_cache(tensors: dict, cache: Path) -> None:
    """Keep the decoded images for the next command; the cache only saves time, so a folder msif cannot write (or a
    full disk) costs a warning, not the command."""
    try:
        atomic_torch_save(tensors, cache)
    except OSError as err:
        log.warning(
            "Could not write the decoded-image cache %s (%s); continuing without it, so the next command decodes "
            "the images again. Point MSIF_CACHE (or cache_dir=...) at a writable folder to keep it.",
            cache,
            err.strerror or err,
        )


def _cache_folder(cache_dir: str | None) -> Path:
    if cache_dir:
        return Path(os.path.expanduser(cache_dir))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "msif"


# --- fingerprints -------------------------------------------------------------------------------------------------


def fingerprint(spec: dict) -> str:
    """What identifies the data `spec` reads, whatever the path it is reached by and whenever its files were
    copied: the names, sizes and contents of its files (image folders, MNIST, CIFAR-10, torchvision roots, array and
    text files), the embedded digits' content; "generated" for the built-in generated sources, whose config is their
    data. A folder's digest is remembered by its listing (formats.tree_key), so this is cheap on every command."""
    kind = spec["kind"]
    if kind in ("tiny", "tiny_corpus", "tiny_reviews"):
        return "generated"
    if kind == "digits":
        return hashlib.sha256(DIGITS_FILE.read_bytes()).hexdigest()[:16]
    if kind in ("arrays", "text", "labelled_text"):
        splits = [spec[s] for s in ("train", "test") if spec.get(s)]
        return hashlib.sha256("".join(formats.content_key(p) for p in splits).encode()).hexdigest()[:16]
    root = Path(os.path.expanduser(str(spec.get("root") or "")))
    if kind == "mnist":
        folders = [root / "MNIST" / "raw"]
    elif kind == "cifar10":
        folders = [root / "cifar-10-batches-py"] if (root / "cifar-10-batches-py").is_dir() else [root / "cifar10"]
    elif kind == "image_folder":
        folders = [root / str(spec["train"]), root / str(spec["test"])]
    else:  # torchvision: the class's own folder under root when it has one (MNIST-style), else root
        own = [root / str(spec["name"]), root / str(spec["name"]).lower()]
        folders = [next((f for f in own if f.is_dir()), root)]
    files = sorted(p for f in folders if f.is_dir() for p in f.rglob("*") if p.is_file())
    if not files:
        return "missing"  # loading stops with the data set's own message
    # the signature code passes no cache_dir, so the memo sits where MSIF_CACHE (the config's default) puts the cache
    memo = _cache_folder(os.environ.get("MSIF_CACHE")) / "fingerprints.json"
    return formats.tree_key(files, kind, base=root, memo=memo)[:16]
