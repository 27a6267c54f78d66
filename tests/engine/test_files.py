"""tl/engine/files.py: an atomic write gives its file the mode the user's umask gives any new
file, and the module never reads or sets the process's umask to do so."""

from __future__ import annotations

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
