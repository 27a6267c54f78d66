"""Shared test fixtures: synthetic image folders, a tiny backbone, and no network.

The synthetic classes differ by colour (red / blue / green tint plus noise), which a
small CNN learns in a few epochs on 32-pixel images: the loop tests take seconds and
still fail if learning is broken. Real images come from ../shared/data; tests that need
them skip where it is absent, except under CI=true, where its absence is a failure.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tl.models import BACKBONES, Backbone

# torch's threads per test process: the README's command runs several processes (pytest-xdist), and
# each takes its share of the cores, as do the processes the tests start (oversubscribed threads
# spin and wait for each other)
THREADS = min(2, max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
os.environ["OMP_NUM_THREADS"] = str(THREADS)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HYMENOPTERA = SHARED_DATA / "hymenoptera_data"
DOGS_VS_CATS = SHARED_DATA / "dogs-vs-cats-subset"
COLOURS = [(200, 40, 40), (40, 40, 200), (40, 200, 40)]


_connect = socket.socket.connect


def _refuse_internet(sock, address, *args, **kwargs):
    # Internet sockets fail at once; Unix sockets (DataLoader workers share tensors through them) work.
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        raise OSError("network access is blocked in tests")
    return _connect(sock, address, *args, **kwargs)


def block_network(monkeypatch, torch_home: Path) -> None:
    monkeypatch.setattr(socket.socket, "connect", _refuse_internet)
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setenv("TL_CACHE_DIR", str(torch_home.parent / "feature-cache"))  # no stray caches in $HOME


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Tests never touch the network: any internet connection fails at once, and the torch
    hub cache is an empty temporary folder, so no real cached weights are found either."""
    block_network(monkeypatch, tmp_path / "torch_home")
    monkeypatch.delenv("TL_DATA_DIR", raising=False)
    torch.set_num_threads(THREADS)


def write_image_folder(root: Path, classes: int = 2, train: int = 12, val: int = 6, size: int = 40,
                       seed: int = 0, phases=("train", "val")) -> Path:
    """root/{train,val}/class_k/*.png: class k is tinted with COLOURS[k], plus noise."""
    rng = np.random.default_rng(seed)
    counts = {"train": train, "val": val, "test": val}
    for phase in phases:
        for k in range(classes):
            folder = root / phase / f"class_{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(counts[phase]):
                noise = rng.integers(-60, 60, size=(size, size, 3))
                pixels = np.clip(np.array(COLOURS[k]) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    return write_image_folder(tmp_path / "tiny")


@pytest.fixture
def three_class_data(tmp_path) -> Path:
    return write_image_folder(tmp_path / "three", classes=3)


class TinyNet(nn.Module):
    """conv-BN-ReLU twice, pool, Linear: a ResNet in miniature (BatchNorm included, so the
    frozen-BatchNorm behaviour can be tested), 1000 outputs like an ImageNet model."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 1000)

    def forward(self, x):
        return self.fc(self.pool(self.block(self.stem(x))).flatten(1))


TINY = Backbone("tiny", TinyNet, head="fc", neck=("block",))  # what the tests register as "tiny"


@pytest.fixture
def tiny_backbone(monkeypatch) -> str:
    """Register "tiny" in the backbone registry for the duration of one test."""
    monkeypatch.setitem(BACKBONES, "tiny", TINY)
    return "tiny"


def require_real_data(path: Path) -> Path:
    if not path.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing, and CI must run the real-image tests")
        pytest.skip(f"{path} not found (it lies beside the project checkout on the project's machines)")
    return path


@pytest.fixture
def hymenoptera() -> Path:
    return require_real_data(HYMENOPTERA)


@pytest.fixture
def own_cache_dir(tmp_path, monkeypatch) -> Path:
    """A feature-cache folder of the test's own (files that share state use it for every test:
    `pytestmark = pytest.mark.usefixtures("own_cache_dir")`)."""
    monkeypatch.setenv("TL_CACHE_DIR", str(tmp_path / "feature-cache"))
    return tmp_path / "feature-cache"


@pytest.fixture
def pretrained(tmp_path, tiny_backbone) -> Path:
    """A 'pretrained' TinyNet state_dict with BatchNorm statistics far from a fresh init's, so a
    run that forgets to load it (or caches from another backbone) shows in the numbers."""
    torch.manual_seed(1234)
    net = TinyNet()
    for bn in (net.stem[1], net.block[1]):
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2)
    path = tmp_path / "pretrained.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture
def trained_run(tiny_data, tiny_backbone, tmp_path, capsys) -> Path:
    from tests.helpers import train_one_epoch

    assert train_one_epoch(capsys, tiny_data, tmp_path / "runs")[0] == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    return run_dir


def mount_small_tmpfs(where: Path, size: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True,
                       capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs root to mount a small tmpfs (a disk that really fills up)")


@pytest.fixture
def full_tmpfs(tmp_path):
    """A 4 MiB tmpfs mounted at tmp_path/disk, where the tests run as root (skipped otherwise);
    `tests.helpers.fill(disk, pages)` leaves that many 4 KiB pages of it free: a real full disk."""
    disk = tmp_path / "disk"
    mount_small_tmpfs(disk, "4m")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.fixture(params=["under a file", "read-only disk", "full disk"])
def unwritable(request, tmp_path):
    """A folder no command can write its results into: one under a file (any user), a read-only
    tmpfs, or a folder to make on a tmpfs with 40 KiB free (where the tests run as root:
    permissions do not stop root, a read-only mount or a full disk does)."""
    from tests.helpers import fill

    if request.param == "under a file":
        (tmp_path / "a-file").write_text("a file, not a folder")
        yield tmp_path / "a-file" / "out"
        return
    disk = tmp_path / "disk"
    mount_small_tmpfs(disk, "2m")
    if request.param == "read-only disk":
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    else:
        fill(disk, 10)
    try:
        yield disk if request.param == "read-only disk" else disk / "out"
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    where = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount_small_tmpfs(where, "8m")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def quick_run(tiny_data, tiny_backbone, tmp_path) -> Path:
    from tests.helpers import train_three_epochs

    return train_three_epochs(tiny_data, tmp_path / "runs")


_WATCHED: list[Path] = []  # folders whose listing or opening is recorded in _SEEN
_SEEN: list[str] = []


def _audit(event: str, args: tuple) -> None:
    """Every listing (os.scandir, os.listdir: os.walk, glob and Path.iterdir use them) and every
    open() of a path inside a watched folder. Without the file names a listing gives, no image
    of the folder can be decoded either. (An audit hook stays for the process: it only records.)"""
    if _WATCHED and event in ("open", "os.scandir", "os.listdir") and args and isinstance(args[0], (str, Path)):
        path = os.path.abspath(args[0])
        if any(path == str(w) or path.startswith(str(w) + os.sep) for w in _WATCHED):
            _SEEN.append(f"{event} {path}")


sys.addaudithook(_audit)


@pytest.fixture
def sealed(tmp_path):
    """train/: 10 + 7 images per class; val/ and test/ exist, and any listing or opening of
    them (or of anything inside) is recorded: the test then asserts nothing was."""
    root = write_image_folder(tmp_path / "sealed", train=10, val=3, size=16, phases=("train", "val", "test"))
    for f in sorted((root / "train" / "class_1").glob("*.png"))[:3]:  # an unequal second class
        f.unlink()
    _SEEN.clear()
    _WATCHED[:] = [(root / "val").resolve(), (root / "test").resolve()]
    yield root
    _WATCHED.clear()
    assert not _SEEN, f"val/ or test/ was read: {_SEEN[:3]}"
