"""A user's own data in three formats: an image folder, a torchvision data set class, arrays in files.

Each reader returns whole train and test splits (`Source`) with class names; images as uint8 (N, C, H, W) with a
scale of 1/255, arrays as given (a `.npy` file memory-mapped, so only the rows a task selects are read). The options
each reader takes are listed in `SOURCE_KINDS` (msif.data.sources), which checks them before anything is read.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msif.errors import MsifError
from msif.io import atomic_write_json, update_with_file

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _path(value: Any) -> Path:
    return Path(os.path.expanduser(str(value)))


# --- images: decoding, channels, size ----------------------------------------------------------------------------


def _hw(size: Any) -> tuple[int, int] | None:
    if size is None:
        return None
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def decode_images(paths: list[Path], channels: int, resize: int | None, crop: Any, where: str) -> torch.Tensor:
    """Decode image files to one uint8 (N, C, H, W) tensor: converted to `channels` (1 grey, 3 RGB), the shorter
    side scaled to `resize` (bilinear) and the centre `crop` (h, w) kept, when given. Sizes must then agree."""
    from PIL import Image

    crop_hw = _hw(crop)

    def decode(p: Path) -> np.ndarray:
        with Image.open(p) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if resize:
                w, h = im.size
                scale = resize / min(w, h)
                im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
            if crop_hw:
                w, h = im.size
                ch, cw = crop_hw
                if ch > h or cw > w:
                    raise MsifError(
                        f"{p} is {h}x{w} pixels{' after resizing' if resize else ''}, smaller than the crop {ch}x{cw} "
                        f"({where}.crop).",
                        f"Lower {where}.crop or set {where}.resize to at least {max(ch, cw)}.",
                    )
                left, top = (w - cw) // 2, (h - ch) // 2
                im = im.crop((left, top, left + cw, top + ch))
            a = np.asarray(im)
        return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        images = list(pool.map(decode, paths, chunksize=256))
    shapes: dict[tuple, Path] = {}
    for p, im in zip(paths, images, strict=True):
        shapes.setdefault(im.shape, p)
    if len(shapes) != 1:
        found = ", ".join(f"{s[1]}x{s[2]} ({p.name})" for s, p in list(shapes.items())[:3])
        raise MsifError(
            f"The images of {where} do not all have one size after decoding: {found}.",
            f"Set {where}.resize (the shorter side, e.g. 32) and {where}.crop (e.g. 32) so every image comes out the "
            "same size.",
        )
    return torch.from_numpy(np.stack(images))


def image_tensors(x: torch.Tensor, channels: int | None, resize: int | None, crop: Any, where: str) -> torch.Tensor:
    """The same conversions as `decode_images` for images already in a uint8 (N, C, H, W) tensor."""
    if channels and x.shape[1] != channels:
        if channels == 3 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1).contiguous()
        elif channels == 1 and x.shape[1] == 3:  # ITU-R 601 luma, as PIL's convert("L")
            luma = torch.tensor([299, 587, 114], dtype=torch.int32).view(1, 3, 1, 1)
            x = ((x.to(torch.int32) * luma).sum(1, keepdim=True) + 500).div(1000, rounding_mode="floor")
            x = x.clamp(0, 255).to(torch.uint8)
        else:
            raise MsifError(
                f"{where} has {x.shape[1]} channels, which cannot be converted to {channels}.",
                f"Set {where}.channels to null (keep them) or to 1 or 3 for grey or colour images.",
            )
    if resize:
        h, w = x.shape[-2:]
        scale = resize / min(h, w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        parts = [
            torch.nn.functional.interpolate(chunk.float(), size=size, mode="bilinear", antialias=True)
            for chunk in x.split(1024)
        ]
        x = torch.cat(parts).round().clamp(0, 255).to(torch.uint8)
    if crop is not None:
        ch, cw = _hw(crop)
        h, w = x.shape[-2:]
        if ch > h or cw > w:
            raise MsifError(
                f"The images of {where} are {h}x{w}, smaller than the crop {ch}x{cw}.",
                f"Lower {where}.crop or set {where}.resize.",
            )
        top, left = (h - ch) // 2, (w - cw) // 2
        x = x[..., top : top + ch, left : left + cw].contiguous()
    return x


# --- image folder ------------------------------------------------------------------------------------------------


def image_folder_files(
    root: Path, splits: dict[str, str], classes: list[str] | None, where: str
) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """The class names and, per split, the (image file, label) pairs of `<root>/<split>/<class>/*`: the classes are
    the train split's subfolders (sorted), or `classes` when given; both splits must have every one, with images."""
    if not root.is_dir():
        raise MsifError(
            f"The image folder {root} ({where}.root) does not exist.",
            f"Point {where}.root at a folder holding {'/'.join(splits.values())} subfolders of <class>/<image> files.",
        )
    files: dict[str, list[tuple[Path, int]]] = {}
    names = list(classes) if classes else None
    for split, sub in splits.items():
        split_dir = root / sub
        if not split_dir.is_dir():
            raise MsifError(
                f"The image folder {root} has no '{sub}' subfolder for its {split} split ({where}.{split}).",
                f"Expected {root}/{sub}/<class>/<image files>; set {where}.{split} to the subfolder's name.",
            )
        found = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
        if names is None:
            names = found
        missing = [c for c in names if c not in found]
        extra = [c for c in found if c not in names] if not classes else []
        if missing or extra:
            raise MsifError(
                f"The {split} split {split_dir} lacks the class folders {missing}"
                + (f" and has ones the train split does not ({extra})" if extra else "")
                + ".",
                "Both splits need one subfolder per class, with the same names.",
            )
        files[split] = []
        for label, c in enumerate(names):
            images = sorted(p for p in (split_dir / c).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise MsifError(
                    f"The class folder {split_dir / c} has no images (looked for {', '.join(IMAGE_SUFFIXES)}).",
                    "Put the class's image files there, or remove the folder from both splits.",
                )
            files[split].extend((p, label) for p in images)
    if not names or len(names) < 2:
        raise MsifError(
            f"The image folder {root} has {len(names or [])} class folder(s) in its train split; a classification "
            "task needs at least two.",
            f"Lay it out as {root}/<split>/<class>/<image files>.",
        )
    return names, files


def listing_key(paths: list[Path], extra: str = "", base: Path | None = None) -> str:
    """A hash of file names (relative to `base` when given), sizes and modification times: it changes whenever a
    file is added, removed or rewritten — and also when the same files are copied again (new times)."""
    key = hashlib.sha256(extra.encode())
    for p in paths:
        st = p.stat()
        key.update(f"{_relative(p, base)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return key.hexdigest()


def _relative(path: Path, base: Path | None) -> Path:
    return path.relative_to(base) if base is not None and path.is_relative_to(base) else path


def tree_key(paths: list[Path], extra: str = "", base: Path | None = None, memo: Path | None = None) -> str:
    """A hash of file names (relative to `base` when given), sizes and contents. Unlike `listing_key` it survives a
    copy or a re-provisioned data folder, whose files get new modification times: the data are the same, so runs
    made from them stay reusable. Reading every byte costs about a second per 100 MB, so the digest is remembered
    per listing (names, sizes, times, in this process and in the JSON file `memo` when given) and recomputed only
    when the listing changes."""
    stamp = listing_key(paths, extra, base) + ":" + str(base)
    if stamp in _TREE_KEYS:
        return _TREE_KEYS[stamp]
    remembered = _read_memo(memo)
    if stamp not in remembered:
        key = hashlib.sha256(extra.encode())
        for p in paths:
            key.update(f"{_relative(p, base)}:{p.stat().st_size}:".encode())
            update_with_file(key, p)
            key.update(b";")
        remembered = _read_memo(memo) | {stamp: key.hexdigest()}  # re-read: another process may have added one
        _write_memo(memo, remembered)
    _TREE_KEYS[stamp] = remembered[stamp]
    return _TREE_KEYS[stamp]


_TREE_KEYS: dict[str, str] = {}


def _read_memo(memo: Path | None) -> dict[str, str]:
    if memo is None or not memo.is_file():
        return {}
    try:
        data = json.loads(memo.read_text())
    except (OSError, ValueError):
        return {}  # a memo can always be rebuilt
    return data if isinstance(data, dict) else {}


def _write_memo(memo: Path | None, data: dict[str, str]) -> None:
    if memo is None:
        return
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(dict(list(data.items())[-256:]), memo)  # the newest listings; the file stays small
    except OSError as err:
        log.debug("could not write the fingerprint memo %s (%s); the next command reads the files again", memo, err)


# --- torchvision --------------------------------------------------------------------------------------------------


def torchvision_class(name: str, where: str) -> type:
    import torchvision.datasets as tvd

    cls = getattr(tvd, str(name), None)
    if not isinstance(cls, type):
        known = sorted(n for n in dir(tvd) if isinstance(getattr(tvd, n), type) and n[0].isupper())
        raise MsifError(
            f"torchvision.datasets has no data set class '{name}' ({where}.name).",
            f"Use one of its {len(known)} classes by name, e.g. KMNIST, FashionMNIST, SVHN, CIFAR100 or STL10.",
        )
    params = inspect.signature(cls).parameters
    if "train" not in params and "split" not in params:
        raise MsifError(
            f"torchvision.datasets.{name} takes neither `train=` nor `split=`, so msif cannot ask it for a train and "
            "a test split.",
            "Save its splits as arrays (.npz with x and y) and use kind: arrays, or choose a class with the usual "
            "(root, train or split, download) arguments.",
        )
    return cls


def torchvision_split(cls: type, root: Path, train: bool, download: bool, args: dict, where: str):
    params = inspect.signature(cls).parameters
    split = {"train": train} if "train" in params else {"split": "train" if train else "test"}
    if "download" in params:
        split["download"] = download
    try:
        return cls(str(root), **split, **args)
    except TypeError as err:
        raise MsifError(
            f"torchvision.datasets.{cls.__name__}({root}, {split}, **{args}) was refused: {err}.",
            f"Pass the class's other required arguments in {where}.args.",
        ) from None
    except Exception as err:  # noqa: BLE001 - "not found / corrupted" comes as RuntimeError, others as OSError
        raise MsifError(
            f"torchvision.datasets.{cls.__name__} could not read its {'train' if train else 'test'} split from "
            f"{root}: {' '.join(str(err).split())}",
            f"Put its files in {root} in the layout torchvision expects, or set {where}.download=true on a machine "
            "with internet.",
        ) from None


def torchvision_arrays(data, where: str) -> tuple[torch.Tensor, torch.Tensor, list[str] | None, float]:
    """Images and labels of a torchvision data set object: its `data`/`targets` (or `labels`) arrays when it has
    them, else every item decoded; uint8 images come back as (N, C, H, W)."""
    x = getattr(data, "data", None)
    y = getattr(data, "targets", None)
    if y is None:
        y = getattr(data, "labels", None)
    if isinstance(x, (np.ndarray, torch.Tensor)) and y is not None and len(x) == len(y):
        x = torch.as_tensor(np.asarray(x))
        if x.dim() == 3:  # (N, H, W): grey
            x = x.unsqueeze(1)
        elif x.dim() == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):  # (N, H, W, C)
            x = x.permute(0, 3, 1, 2)
        y = torch.as_tensor(np.asarray(y)).long()
    else:
        xs, ys = [], []
        for i in range(len(data)):
            item, label = data[i][:2]
            a = np.asarray(item.convert("RGB") if hasattr(item, "convert") and item.mode not in ("L", "RGB") else item)
            xs.append(torch.from_numpy(a[None] if a.ndim == 2 else a.transpose(2, 0, 1).copy()))
            ys.append(int(label))
        x, y = torch.stack(xs), torch.tensor(ys, dtype=torch.long)
    x = x.contiguous()
    scale = 1 / 255 if x.dtype == torch.uint8 else 1.0
    classes = getattr(data, "classes", None)
    return x, y, [str(c) for c in classes] if classes else None, scale


# --- arrays -------------------------------------------------------------------------------------------------------


def _array_file(path: Path, where: str) -> Any:
    if not path.is_file():
        raise MsifError(f"The array file {path} ({where}) does not exist.", "Check the path.")
    if path.suffix == ".npy":
        return np.load(path, mmap_mode="r")  # only the rows a task selects are read
    raise MsifError(
        f"{path} ({where}) is not a .npy file.",
        "Give x and y each as a .npy file, or one .npz / .pt file holding both.",
    )


def read_arrays(entry: Any, where: str) -> tuple[Any, torch.Tensor, list[str] | None]:
    """x (array or memory map), y (long tensor) and the class names stored with them, from one split's entry: a .npz
    or .pt file holding x, y and optionally classes, or a mapping {x: <.npy>, y: <.npy>}."""
    if isinstance(entry, dict):
        unknown = set(entry) - {"x", "y"}
        if unknown or not {"x", "y"} <= set(entry):
            raise MsifError(
                f"{where} must be a file or a mapping with exactly the keys x and y (got {sorted(entry)}).",
                f"Write e.g. {where}: {{x: train_x.npy, y: train_y.npy}}.",
            )
        x = _array_file(_path(entry["x"]), f"{where}.x")
        y, names = _array_file(_path(entry["y"]), f"{where}.y"), None
    else:
        path = _path(entry)
        if not path.is_file():
            raise MsifError(f"The array file {path} ({where}) does not exist.", "Check the path.")
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                content = {k: z[k] for k in z.files}
        elif path.suffix in (".pt", ".pth"):
            content = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise MsifError(
                f"{path} ({where}) is neither a .npz nor a .pt file.",
                f"Save x and y together in a .npz (numpy.savez) or .pt (torch.save of a dict), or give {where} as "
                "{x: <file.npy>, y: <file.npy>}.",
            )
        if not isinstance(content, dict) or not {"x", "y"} <= set(content):
            keys = sorted(content) if isinstance(content, dict) else type(content).__name__
            raise MsifError(f"{path} ({where}) holds {keys}, not the arrays x and y.", "Save a dict with x and y.")
        x, y = content["x"], content["y"]
        names = content.get("classes", content.get("class_names"))
        names = [str(c) for c in np.asarray(names).tolist()] if names is not None else None
    y = np.asarray(y)
    if len(x) != len(y):
        raise MsifError(f"{where} has {len(x):,} inputs but {len(y):,} labels.", "x and y need one row per example.")
    if getattr(x, "ndim", np.ndim(x)) < 2:
        raise MsifError(
            f"{where}: x has shape {tuple(np.shape(x))}; it needs one row per example, (N, features...).",
            "Reshape it to (N, D) for feature vectors or (N, C, H, W) for images.",
        )
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_)):
        raise MsifError(
            f"{where}: the labels y have shape {y.shape} and type {y.dtype}; they must be integer class indices, one "
            "per example.",
            "Store y as integers 0..k-1 (e.g. y.astype('int64')), and the class names separately (classes).",
        )
    if len(y) and y.min() < 0:
        raise MsifError(f"{where}: the labels include {int(y.min())}; class indices start at 0.", "Relabel 0..k-1.")
    return x, torch.from_numpy(y.astype(np.int64)), names


def content_key(entry: Any) -> str:
    """A hash of the content of a split's array files, read in 1 MiB blocks — once per process while the files keep
    their sizes and modification times (a command computes its stages' signatures several times)."""
    paths = [_path(p) for p in ([entry["x"], entry["y"]] if isinstance(entry, dict) else [entry])]
    stamp = tuple(_stamp(p) for p in paths)
    if stamp not in _CONTENT_KEYS:
        key = hashlib.sha256()
        for path in paths:
            if not path.is_file():
                key.update(b"missing")
                continue
            update_with_file(key, path)
        _CONTENT_KEYS[stamp] = key.hexdigest()
    return _CONTENT_KEYS[stamp]


_CONTENT_KEYS: dict[tuple, str] = {}


def _stamp(path: Path) -> tuple:
    if not path.is_file():
        return (str(path), None)
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
