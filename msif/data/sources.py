"""Raw data sources: each loader returns whole train and test splits as tensors with their class names.

Images are kept as uint8 (N, C, H, W) plus a scale to [0, 1]; tasks.py selects, scales and normalises subsets.
Nothing here downloads unless the data set config says `download: true` and the network allows it.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from msif.errors import MsifError
from msif.io import atomic_torch_save, load_tensors

log = logging.getLogger(__name__)

DIGITS_FILE = Path(__file__).parent / "digits.csv.gz"
DIGITS_N_TRAIN = 1347  # the first 1,347 rows train, the last 450 test (fixed, no shuffling)
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class Source:
    """A data set's full train and test splits. `x_*` are uint8 or float; multiply by `scale` to get [0, 1]."""

    name: str
    class_names: list[str]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    scale: float = 1.0

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def load_source(ds: DictConfig, cache_dir: str | None = None) -> Source:
    """Load the source named by `ds.source`."""
    loaders = {"digits": _load_digits, "tiny": _load_tiny, "mnist": _load_mnist, "cifar10": _load_cifar10}
    if ds.source not in loaders:
        raise MsifError(
            f"Unknown data source '{ds.source}' in dataset '{ds.name}'.",
            f"dataset.source must be one of {sorted(loaders)}.",
        )
    return loaders[ds.source](ds, cache_dir)


def _load_digits(ds: DictConfig, cache_dir: str | None) -> Source:
    with gzip.open(DIGITS_FILE, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    x = torch.from_numpy(table[:, :64]).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(table[:, 64]).long()
    n = DIGITS_N_TRAIN
    return Source("digits", [str(i) for i in range(10)], x[:n], y[:n], x[n:], y[n:], scale=1 / 16)


def _load_tiny(ds: DictConfig, cache_dir: str | None) -> Source:
    """Gaussian classes around seeded random centres; the same config always gives the same points."""
    g = ds.generator
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


def _data_root(ds: DictConfig) -> Path:
    if not ds.root:
        raise MsifError(
            f"dataset '{ds.name}' has no data folder (dataset.root is empty).", "Set MSIF_DATA or data_root=<folder>."
        )
    return Path(os.path.expanduser(str(ds.root)))


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


def _load_mnist(ds: DictConfig, cache_dir: str | None) -> Source:
    root = _data_root(ds)
    raw = root / "MNIST" / "raw"
    splits = {}
    for train in (True, False):
        files = _mnist_files(raw, train)
        if files is None:
            if not ds.download:
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


def _load_cifar10(ds: DictConfig, cache_dir: str | None) -> Source:
    root = _data_root(ds)
    if (root / "cifar-10-batches-py").is_dir():
        return _cifar10_torchvision(root, download=False)
    if (root / "cifar10").is_dir():
        return _cifar10_image_folder(root / "cifar10", cache_dir)
    if ds.download:
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
    """Read cifar10/{train,test}/<class>/*.jpg, decoding once and caching uint8 tensors keyed by the file list."""
    files: dict[str, list[tuple[Path, int]]] = {}
    for split in ("train", "test"):
        split_dir = folder / split
        if not split_dir.is_dir():
            raise MsifError(
                f"The CIFAR-10 image folder {folder.resolve()} has no '{split}' subfolder.",
                "Expected cifar10/train/<class>/*.jpg and cifar10/test/<class>/*.jpg.",
            )
        missing = [c for c in CIFAR10_CLASSES if not (split_dir / c).is_dir()]
        if missing:
            raise MsifError(
                f"The CIFAR-10 image folder {split_dir.resolve()} is missing the classes {missing}.",
                f"Every one of the ten classes {CIFAR10_CLASSES} needs a subfolder of images; unpack the full "
                "archive again.",
            )
        files[split] = [
            (p, label)
            for label, c in enumerate(CIFAR10_CLASSES)
            for p in sorted((split_dir / c).iterdir())
            if p.suffix.lower() in (".jpg", ".jpeg", ".png")
        ]
    key = hashlib.sha256()
    for split in ("train", "test"):
        for p, label in files[split]:
            st = p.stat()
            key.update(f"{split}/{p.parent.name}/{p.name}:{st.st_size}:{st.st_mtime_ns}:{label};".encode())
    cache = _cache_folder(cache_dir) / f"cifar10-{key.hexdigest()[:16]}.pt"
    tensors = load_tensors(cache) if cache.exists() else None
    if tensors is None:
        tensors = {}
        for split in ("train", "test"):
            tensors[f"x_{split}"] = _decode_images([p for p, _ in files[split]])
            tensors[f"y_{split}"] = torch.tensor([label for _, label in files[split]], dtype=torch.long)
        _save_cache(tensors, cache)
    return Source(
        "cifar10",
        list(CIFAR10_CLASSES),
        tensors["x_train"],
        tensors["y_train"],
        tensors["x_test"],
        tensors["y_test"],
        scale=1 / 255,
    )


def _decode_images(paths: list[Path]) -> torch.Tensor:
    from PIL import Image

    def decode(p: Path) -> torch.Tensor:
        with Image.open(p) as im:
            return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        images = list(pool.map(decode, paths, chunksize=256))
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1:
        raise MsifError(
            f"The CIFAR-10 images do not all have one size (found {sorted(shapes)[:3]}).",
            "Every image must be 32x32 RGB; unpack the archive again.",
        )
    return torch.stack(images)


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
