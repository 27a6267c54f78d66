"""tl/engine/folder_lock.py: one writer per folder. A second process that asks for a held
folder stops at once naming the holder (pid, command, machine, since when), or waits for it
and says for whom; a holder that is killed, however, frees the folder at once; a second hold
inside one process is a second writer too; a forked child neither keeps nor frees its parent's
lock; released, the lock file is empty and free."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import interruptible
from tl.engine import folder_lock
from tl.engine.folder_lock import FolderBusy, hold

ROOT = Path(__file__).resolve().parents[2]
HOLDER = """
import sys, time
from pathlib import Path
from tl.engine.folder_lock import hold
with hold(Path(sys.argv[1]), ".test.lock", wait=False, command="the holder's command"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
    last = time.time()  # the last instant it surely held the folder
print("held until", last, flush=True)
"""


def _holder(folder: Path, seconds: float = 60) -> subprocess.Popen:
    """Another process that holds `folder` for `seconds`, started once it says so."""
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(seconds)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True, preexec_fn=interruptible)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_second_process_stops_at_once_naming_the_holder(tmp_path):
    child = _holder(tmp_path)
    try:
        started = time.time()
        with pytest.raises(FolderBusy) as caught, hold(tmp_path, ".test.lock", wait=False):
            pytest.fail("the block ran while another process held the folder")
        message = str(caught.value)
        assert time.time() - started < 5  # at once: the holder's line is read, nothing waited for
        assert f"is being written by process {child.pid} (the holder's command; on {socket.gethostname()}, " \
               f"since {time.strftime('%Y-%m-%d')}" in message, message
        assert "\n" not in message
        assert not folder_lock.held_here(tmp_path, ".test.lock")
    finally:
        child.kill()
        child.wait()


def test_a_waiting_process_says_for_whom_and_writes_once_the_holder_is_done(tmp_path):
    child = _holder(tmp_path, seconds=1.5)
    said = []
    with hold(tmp_path, ".test.lock", wait=True, command="the waiter", note=" (its rows are kept)", log=said.append):
        entered = time.time()
        assert (tmp_path / ".test.lock").read_text().startswith(f"process {os.getpid()} (the waiter; on ")
    released = float(child.stdout.readline().split()[-1])
    assert entered >= released  # it entered only after the holder had finished
    assert said[0].startswith(f"{tmp_path} is being written by process {child.pid} (the holder's command; ")
    assert said[0].endswith("waiting for it to finish (its rows are kept)")
    assert said[1] == f"{tmp_path} is free: writing"
    child.wait()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_a_killed_holder_frees_the_folder_at_once(tmp_path, sig):
    child = _holder(tmp_path)
    os.kill(child.pid, sig)
    child.wait()
    with hold(tmp_path, ".test.lock", wait=False):  # nothing stale is left to refuse it
        assert folder_lock.held_here(tmp_path, ".test.lock")


FORKING_HOLDER = """
import os, sys, time
from pathlib import Path
from tl.engine.folder_lock import hold
with hold(Path(sys.argv[1]), ".test.lock", wait=False, command="the parent"):
    started, ready = os.pipe()
    child = os.fork()  # as a DataLoader worker is
    if child == 0:
        os.write(ready, b"!")  # the child runs (its first act, closing its copies, is done)
        if sys.argv[2] == "child lives on":
            time.sleep(60)
        sys.exit(0)  # out through the end of the with block, as a normal exit goes
    os.read(started, 1)
    print(child, flush=True)
    if sys.argv[2] == "child exits":
        os.waitpid(child, 0)
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_forked_child_neither_keeps_nor_releases_its_parents_lock(tmp_path):
    """flock belongs to the open file, which fork shares: a child that outlives its killed
    parent must not keep the folder, and a child that ends must not free it under its parent."""
    for mode in ("child lives on", "child exits"):
        parent = subprocess.Popen([sys.executable, "-c", FORKING_HOLDER, str(tmp_path), mode], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        child = int(parent.stdout.readline())
        assert parent.stdout.readline().strip() == "held"
        try:
            if mode == "child exits":  # the parent still holds it, and its line is intact
                assert _try(tmp_path) == "busy", mode
                assert (tmp_path / ".test.lock").read_text().startswith(f"process {parent.pid} (the parent; ")
            else:
                os.kill(parent.pid, signal.SIGKILL)
                parent.wait()
                os.kill(child, 0)  # the child is still alive
                assert _try(tmp_path) == "held", mode
        finally:
            parent.kill()
            parent.wait()
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


def test_a_second_hold_in_the_same_process_is_a_second_writer(tmp_path):
    with hold(tmp_path, ".test.lock", wait=False, command="first"):
        with pytest.raises(FolderBusy, match=f"process {os.getpid()} \\(first; "), \
                hold(tmp_path, ".test.lock", wait=False):
            pass
        assert folder_lock.held_here(tmp_path, ".test.lock")  # the first still holds it
        thread_entered = []
        thread = threading.Thread(target=lambda: thread_entered.append(_try(tmp_path)))
        thread.start()
        thread.join()
        assert thread_entered == ["busy"]  # another thread of this process too


def _try(folder: Path) -> str:
    try:
        with hold(folder, ".test.lock", wait=False):
            return "held"
    except FolderBusy:
        return "busy"


def test_a_released_lock_is_empty_and_free_and_its_file_stays(tmp_path):
    with hold(tmp_path, ".test.lock", wait=False):
        pass
    assert (tmp_path / ".test.lock").read_text() == ""  # kept: deleting it could give two processes the lock
    assert not folder_lock.held_here(tmp_path, ".test.lock")
    with pytest.raises(RuntimeError), hold(tmp_path, ".test.lock", wait=False):
        raise RuntimeError("the block failed")
    assert _try(tmp_path) == "held"  # a block that raised released it too


def test_without_fcntl_the_block_runs_unlocked(tmp_path, monkeypatch):
    """Windows has no fcntl: there, as the docstring says, folders are not locked."""
    monkeypatch.setitem(sys.modules, "fcntl", None)  # `import fcntl` raises ImportError
    with hold(tmp_path, ".test.lock", wait=False), hold(tmp_path, ".test.lock", wait=False):
        pass
    assert not (tmp_path / ".test.lock").exists()


@pytest.mark.parametrize("target", ["a user's file", "a missing file", "a folder"])
def test_a_lock_file_that_is_a_link_is_refused_and_its_target_untouched(tmp_path, target):
    """The lock truncates its file: through a link it would empty another file, so a link is refused."""
    from tl import TLError
    from tl.engine.folder_lock import hold

    victim = {"a user's file": tmp_path / "victim.txt", "a missing file": tmp_path / "gone.txt",
              "a folder": tmp_path / "somewhere"}[target]
    if target == "a user's file":
        victim.write_text("precious\n")
    elif target == "a folder":
        victim.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / ".run.lock").symlink_to(victim)
    with pytest.raises(TLError, match="is a link; a lock file must be a plain file"):
        with hold(run, ".run.lock", wait=False):
            pass
    assert (victim.read_text() == "precious\n") if target == "a user's file" else True
    assert not victim.exists() if target == "a missing file" else True


# ----------------------------------------------------------------------------- a lock file taken away
def _remove(lock: Path) -> None:
    lock.unlink()


def _replace(lock: Path) -> None:
    lock.unlink()
    lock.write_text("")  # what a second process's lock makes: a new file of the same name


def _rename(lock: Path) -> None:
    lock.rename(lock.with_name("moved.lock"))


def _link(lock: Path) -> None:
    lock.unlink()
    (lock.parent / "elsewhere").write_text("")
    lock.symlink_to(lock.parent / "elsewhere")


def _copy_over(lock: Path) -> None:
    copy = lock.with_name("copy")
    copy.write_text(lock.read_text())
    copy.replace(lock)  # the same content, another file


@pytest.mark.parametrize("take_away", [_remove, _replace, _rename, _link, _copy_over])
def test_a_holder_whose_lock_file_was_taken_away_writes_nothing_more_there(tmp_path, take_away):
    """A second process could now hold a new lock file of that name: every write into the folder
    (or below it) stops with LockLost, the file untouched; writes elsewhere go on."""
    from tl import TLError
    from tl.engine.files import atomic_write_text
    from tl.engine.folder_lock import LockLost

    folder, elsewhere = tmp_path / "run", tmp_path / "other"
    folder.mkdir()
    elsewhere.mkdir()
    (folder / "sub").mkdir()
    with hold(folder, ".test.lock", wait=False):
        atomic_write_text(folder / "a.txt", "first")  # the lock is intact: written
        take_away(folder / ".test.lock")
        for target in (folder / "a.txt", folder / "sub" / "b.txt"):
            with pytest.raises(LockLost) as caught:
                atomic_write_text(target, "second")
            assert isinstance(caught.value, TLError) and str(folder / ".test.lock") in str(caught.value)
        atomic_write_text(elsewhere / "c.txt", "written")
    assert (folder / "a.txt").read_text() == "first" and not (folder / "sub" / "b.txt").exists()
    assert (elsewhere / "c.txt").read_text() == "written"
    atomic_write_text(folder / "a.txt", "after")  # released: the folder is no longer this process's to check


def test_a_lock_file_that_is_not_a_plain_file_is_one_error_naming_it(tmp_path):
    """A FIFO or a socket where the lock file belongs holds no holder's line: refused by name,
    at once (a FIFO opened for reading would otherwise wait, or fail without a name)."""
    from tl import TLError

    fifo, sock_dir = tmp_path / "fifo", tmp_path / "sock"
    for folder in (fifo, sock_dir):
        folder.mkdir()
    os.mkfifo(fifo / ".test.lock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock_dir / ".test.lock"))
    try:
        for folder in (fifo, sock_dir):
            with pytest.raises(TLError, match=f"{folder / '.test.lock'} is not a plain file"):
                with hold(folder, ".test.lock", wait=False):
                    pass
    finally:
        server.close()


def _holder_line_fails(monkeypatch) -> None:
    """Every os.write to a lock file fails as on a full disk (other writes go through)."""
    import errno

    real_write = os.write

    def write(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".lock"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)


def test_a_holder_line_that_cannot_be_written_names_the_lock_file_and_leaves_none(tmp_path, monkeypatch):
    """A full disk when the holder's line is written: one OSError naming the lock file (not a
    second, unnamed one from closing the file), and a lock file this hold made is gone, so a new
    folder is left empty (and a failed command removes it); one that was there stays."""
    import errno

    old = tmp_path / "old"
    old.mkdir()
    (old / ".test.lock").write_text("")
    for folder, kept in ((tmp_path / "new", False), (old, True)):
        folder.mkdir(exist_ok=True)
        with monkeypatch.context() as patch:
            _holder_line_fails(patch)
            with pytest.raises(OSError) as caught:
                with hold(folder, ".test.lock", wait=False):
                    pass
        assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(folder / ".test.lock")
        assert (folder / ".test.lock").exists() == kept, folder


def test_a_run_on_a_really_full_disk_leaves_no_folder(tmp_path, tiny_data, tiny_backbone, capsys):
    """A disk with no byte free before the run opens its folder: one error line naming the
    lock file, and nothing left under --out (a real tmpfs; skipped where it cannot be mounted)."""
    import main
    from tests.conftest import mount_small_tmpfs

    disk = tmp_path / "disk"
    mount_small_tmpfs(disk, "256k")
    try:
        with contextlib.suppress(OSError), open(disk / "filler", "wb") as f:
            f.write(b"\0" * 2**20)
        code = main.main(["-e", "resnet_scratch", "-b", "tiny", "--data", str(tiny_data), "--epochs", "1",
                          "--out", str(disk / "a" / "b"), "--no-progress", "--image-size", "32"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("error:") == 1 and "while writing /" in err, err
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_plain_lock_file_that_cannot_be_opened_gives_the_real_reason(tmp_path):
    """A folder whose lock file exists but is on a read-only disk (a folder turned read-only after
    an earlier update): the machine's own error (read-only file system), not "not a plain file"."""
    import errno
    import subprocess

    from tests.conftest import mount_small_tmpfs

    disk = tmp_path / "disk"
    mount_small_tmpfs(disk, "1m")
    try:
        (disk / ".test.lock").write_text("")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        with pytest.raises(OSError) as caught, hold(disk, ".test.lock", wait=False):
            pass
        assert caught.value.errno == errno.EROFS
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
