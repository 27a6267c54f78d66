"""tl/engine/files.py: an atomic write gives its file the mode the user's umask gives any new
file, and the module never reads or sets the process's umask to do so."""

from __future__ import annotations

import errno
import importlib
import os
import stat

import pytest
import torch

from tl.engine import checkpoint, files


@pytest.mark.parametrize("umask, mode", [(0o027, 0o640), (0o022, 0o644)], ids=["umask027", "umask022"])
def test_an_atomic_write_gets_the_mode_of_the_users_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        text = files.atomic_write_text(tmp_path / "config.json", "{}\n")
        weights = files.atomic_save({"w": torch.ones(2)}, tmp_path / "best.pth")
        fd, raw = files.temporary_beside(tmp_path / "0123abcd.raw")  # a temporary stays the owner's alone
        os.close(fd)
    finally:
        os.umask(old)
    assert stat.S_IMODE(text.stat().st_mode) == mode
    assert stat.S_IMODE(weights.stat().st_mode) == mode
    assert stat.S_IMODE(raw.stat().st_mode) == 0o600


def test_importing_and_writing_never_touch_the_umask(tmp_path, monkeypatch):
    def no_umask(*args):
        raise AssertionError("os.umask was called")

    monkeypatch.setattr(os, "umask", no_umask)
    reloaded = importlib.reload(files)
    importlib.reload(checkpoint)  # it once set the umask at import to read it
    reloaded.atomic_write_text(tmp_path / "history.csv", "epoch\n")
    reloaded.atomic_save({"w": torch.ones(2)}, tmp_path / "best.pth")
    assert (tmp_path / "history.csv").read_text() == "epoch\n"
    assert torch.equal(torch.load(tmp_path / "best.pth", weights_only=True)["w"], torch.ones(2))


def test_a_crash_during_a_save_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    files.atomic_save({"w": torch.ones(3)}, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # killed in the middle of writing

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        files.atomic_save({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


@pytest.mark.usefixtures("own_cache_dir")
def test_a_full_disk_is_reported_as_enospc_not_eio(small_disk):
    """atomic_write deletes its temporary *before* measuring the free space, so the space the
    temporary took counts as free: a full disk is reported as 'errno 5 EIO, 8.0 MB free'."""
    with pytest.raises(OSError) as info:
        files.atomic_save({"x": torch.zeros(3 * 2**20)}, small_disk / "c.pt")  # 12 MB on 8 MB
    assert info.value.errno == errno.ENOSPC, info.value


@pytest.mark.usefixtures("own_cache_dir")
def test_a_killed_writers_temporary_files_go_and_a_live_ones_stay(tmp_path):
    dead = tmp_path / ".x.pt.999999999.abc.tmp"  # no such process
    live = tmp_path / f".x.pt.{os.getpid()}.abc.tmp"  # a save in progress in this process
    dead.write_bytes(b"half"), live.write_bytes(b"half")
    assert files.remove_stale_temporaries(tmp_path) == [dead]
    assert live.exists() and not dead.exists()
