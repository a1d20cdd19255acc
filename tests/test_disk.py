"""A full disk and a read-only folder: a one-paragraph error before any work where it can be known, and the last good
files intact where it cannot.

Real file systems, not mocks: a small tmpfs mounted for the test (needs root, as on CI; skipped elsewhere).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.faults


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "fs"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.decode().strip() or 'not root'})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def msif(root: Path, *args: str, cache: Path | None = None) -> subprocess.CompletedProcess:
    env = os.environ | {"MSIF_OUTPUTS": str(root), "OMP_NUM_THREADS": "1"}
    if cache is not None:
        env["MSIF_CACHE"] = str(cache)
    return subprocess.run([sys.executable, "-m", "msif", *args], env=env, capture_output=True, text=True, timeout=300)


def fill(fs: Path, leave: int) -> None:
    """Fill `fs` until at most `leave` bytes are free."""
    with open(fs / f"filler-{uuid.uuid4().hex}", "wb") as f:
        try:
            while True:
                st = os.statvfs(fs)
                free = st.f_bavail * st.f_frsize
                if free <= leave:
                    break
                f.write(b"\0" * min(free - leave, 1 << 16))
                f.flush()
        except OSError:
            pass


def one_paragraph(result: subprocess.CompletedProcess, *phrases: str) -> None:
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert "Traceback" not in out, out
    for phrase in phrases:
        assert phrase in out, out


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def test_read_only_output_root(tmpfs: Path) -> None:
    """A finished run still reads from a read-only root; a new run is refused before it trains, naming the folder."""
    root = tmpfs / "out"
    assert msif(root, "pretrain", "dataset=tiny").returncode == 0
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)

    again = msif(root, "pretrain", "dataset=tiny")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "reusing the finished run" in again.stdout

    new = msif(root, "pretrain", "dataset=tiny", "seed=1")
    one_paragraph(new, "could not create the pretrain run folder", "Read-only file system", "output_root=")
    assert "saved" not in new.stdout  # nothing trained: the refusal comes first

    missing = msif(tmpfs / "elsewhere", "pretrain", "dataset=tiny")
    one_paragraph(missing, "could not create the output root", "Read-only file system")


def test_full_disk_at_start(tmpfs: Path) -> None:
    fill(tmpfs, 0)
    result = msif(tmpfs / "out", "pretrain", "dataset=tiny")
    one_paragraph(result, "The disk is full", "rerun the command")
    assert not temporaries(tmpfs)


def test_full_disk_mid_checkpoint_keeps_the_last_good_one(tmpfs: Path) -> None:
    """The digits checkpoint (~25 kB) does not fit in the space left, its config (~2 kB) does: the save fails after
    training, the error says so, the previous checkpoint still loads unchanged and no temporary file is left."""
    root = tmpfs / "out"
    args = ("pretrain", "dataset=digits", "train.pretrain.steps=5")
    assert msif(root, *args).returncode == 0
    (checkpoint,) = root.rglob("checkpoint.pt")
    before = checkpoint.read_bytes()
    fill(tmpfs, 12 * 1024)

    result = msif(root, *args, "force=true")
    one_paragraph(result, "The disk is full", "unchanged")
    assert checkpoint.read_bytes() == before
    torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert not temporaries(tmpfs)


def test_read_only_cache_is_a_warning(tmpfs: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The decoded-image cache only saves time: a read-only one costs a warning, the images still load."""
    from PIL import Image

    from msif.data.sources import CIFAR10_CLASSES, _cifar10_image_folder

    for split in ("train", "test"):
        for label, name in enumerate(CIFAR10_CLASSES):
            folder = tmp_path / "cifar10" / split / name
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (32, 32), (label * 20, i * 100, 7)).save(folder / f"{i}.png")
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    with caplog.at_level("WARNING"):
        source = _cifar10_image_folder(tmp_path / "cifar10", str(tmpfs / "cache"))
    assert source.x_train.shape == (20, 3, 32, 32)
    assert torch.equal(source.y_train, torch.arange(10).repeat_interleave(2))
    assert "Could not write the decoded-image cache" in caplog.text
    assert "Read-only file system" in caplog.text
