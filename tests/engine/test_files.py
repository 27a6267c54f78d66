"""tl/engine/files.py: an atomic write gives its file the mode the user's umask gives any new
file, and the module never reads or sets the process's umask to do so."""

from __future__ import annotations

import errno
import importlib
import os
import stat
from pathlib import Path

import pytest
import torch

from tests.helpers import fill
from tests.test_full_disk import FillingDisk
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


# ----------------------------------------------------------------------------- a write that fails
WRITERS = {
    "text": lambda path, src: files.atomic_write_text(path, "a table\n" * 500),
    "bytes": lambda path, src: files.atomic_write_bytes(path, b"\x89PNG" + bytes(4000)),
    "copy": lambda path, src: files.atomic_copy(src, path),
    "torch.save": lambda path, src: files.atomic_save({"w": torch.arange(1000.0)}, path),
    "json": lambda path, src: files.write_json(path, {"epochs": list(range(500))}),
}


def _fail_at_fsync(monkeypatch):
    def fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync)


def _fail_at_rename(monkeypatch):
    def replace(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(src), None, str(dst))

    monkeypatch.setattr(os, "replace", replace)


FAILURES = {
    "no room": lambda monkeypatch: FillingDisk(monkeypatch, 0),
    "room for 100 bytes": lambda monkeypatch: FillingDisk(monkeypatch, 100),
    "room for 3000 bytes": lambda monkeypatch: FillingDisk(monkeypatch, 3000),
    "at fsync": _fail_at_fsync,
    "at the rename": _fail_at_rename,
}


@pytest.mark.parametrize("old", [b"the old whole file\n", None], ids=["over an old file", "a new file"])
@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("writer", WRITERS)
def test_a_write_that_fails_anywhere_leaves_the_old_file_or_none(tmp_path, monkeypatch, writer, failure, old):
    """Whatever kind of file, and wherever its write fails (a full disk after a few bytes, the
    flush to disk, the rename): an OSError naming the file, no temporary left, the old file whole."""
    src = tmp_path / "source.csv"
    src.write_text("path,prediction\n" * 400)
    target = tmp_path / "out" / "target"
    target.parent.mkdir()
    if old is not None:
        target.write_bytes(old)
    with monkeypatch.context() as m:
        FAILURES[failure](m)
        with pytest.raises(OSError) as raised:
            WRITERS[writer](target, src)
    assert raised.value.filename == str(target)  # the message names the file, not its temporary
    assert raised.value.errno in (errno.ENOSPC, errno.EIO)
    assert sorted(p.name for p in target.parent.iterdir()) == ([] if old is None else ["target"])
    assert old is None or target.read_bytes() == old


def test_a_failed_write_is_one_error_line_naming_the_file(tmp_path, monkeypatch, capsys):
    from tl.engine.command import command

    with monkeypatch.context() as m:
        FillingDisk(m, 10)
        code = command(lambda: files.atomic_write_text(tmp_path / "summary.csv", "x" * 100))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: no space left on the device while writing {tmp_path / 'summary.csv'}")


def test_a_write_on_a_really_full_disk_leaves_the_old_file(full_tmpfs):
    target = full_tmpfs / "runs.csv"
    target.write_text("the old table\n")
    fill(full_tmpfs, 0)
    for write in (lambda: files.atomic_write_text(target, "a new table\n" * 2000),
                  lambda: files.atomic_save({"w": torch.zeros(10_000)}, target)):
        with pytest.raises(OSError) as raised:
            write()
        assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(target)
        assert target.read_text() == "the old table\n"
        assert sorted(p.name for p in full_tmpfs.iterdir()) == [".filler", "runs.csv"]


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
    """A full disk is reported as ENOSPC, not EIO: the space atomic_write's temporary took is not
    counted as free when the failure is told apart."""
    with pytest.raises(OSError) as info:
        files.atomic_save({"x": torch.zeros(3 * 2**20)}, small_disk / "c.pt")  # 12 MB on 8 MB
    assert info.value.errno == errno.ENOSPC, info.value


@pytest.mark.usefixtures("own_cache_dir")
def test_a_killed_writers_temporary_files_go_and_a_live_ones_stay(tmp_path):
    dead = tmp_path / ".x.pt.999999999.0123abcd.tmp"  # no such process
    live = tmp_path / f".x.pt.{os.getpid()}.0123abcd.tmp"  # a save in progress in this process
    dead.write_bytes(b"half"), live.write_bytes(b"half")
    assert files.remove_stale_temporaries(tmp_path) == [dead]
    assert live.exists() and not dead.exists()


# ----------------------------------------------------------------------------- all_or_none
def _left_behind(root):
    """The temporaries and kept old versions of all_or_none under `root`."""
    return [*root.rglob(".*.tmp"), *root.rglob(".*.old")]


def _folder(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt(),
                                     RuntimeError("a bug")], ids=["full disk", "ctrl-c", "an error"])
def test_a_failed_all_or_none_block_puts_every_file_back(tmp_path, failure):
    """Overwritten, new, written twice, removed (with the folder it empties), in a nested block:
    after a failure, the folder is byte for byte as before, with no temporary and no old version left."""
    (tmp_path / "old").mkdir()
    for name, text in {"table.csv": "a\n1\n", "page.md": "# old\n", "old/gone.csv": "x\n"}.items():
        (tmp_path / name).write_text(text)
    before = _folder(tmp_path)
    with pytest.raises(type(failure)), files.all_or_none():
        files.atomic_write_text(tmp_path / "table.csv", "a\n2\n")
        files.atomic_write_text(tmp_path / "new.png", "picture")
        with files.all_or_none():  # part of the outer block
            files.atomic_write_text(tmp_path / "table.csv", "a\n3\n")
            files.remove(tmp_path / "old" / "gone.csv")
        assert not (tmp_path / "old" / "gone.csv").exists() and (tmp_path / "table.csv").read_text() == "a\n3\n"
        raise failure
    assert _folder(tmp_path) == before and not _left_behind(tmp_path)


def test_a_finished_all_or_none_block_keeps_only_the_new_files(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "table.csv").write_text("a\n1\n")
    (tmp_path / "old" / "gone.csv").write_text("x\n")
    with files.all_or_none():
        files.atomic_write_text(tmp_path / "table.csv", "a\n2\n")
        files.remove(tmp_path / "old" / "gone.csv")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["table.csv"]
    assert (tmp_path / "table.csv").read_text() == "a\n2\n"


def test_an_all_or_none_block_on_a_really_full_disk_changes_nothing(full_tmpfs):
    """A real disk that fills up at the third file: the two written before it are put back by
    renames (which need no room), the removed one returns."""
    for name in ("a.csv", "b.md", "c.png", "d.csv"):
        (full_tmpfs / name).write_bytes(name.encode() * 100)
    before = _folder(full_tmpfs)
    fill(full_tmpfs, 2)
    before[".filler"] = (full_tmpfs / ".filler").read_bytes()
    with pytest.raises(OSError, match="No space left"), files.all_or_none():
        files.remove(full_tmpfs / "d.csv")
        files.atomic_write_bytes(full_tmpfs / "a.csv", b"1" * 4000)
        files.atomic_write_bytes(full_tmpfs / "b.md", b"2" * 4000)
        files.atomic_write_bytes(full_tmpfs / "c.png", b"3" * 40000)
    assert _folder(full_tmpfs) == before and not _left_behind(full_tmpfs)


def test_an_all_or_none_block_puts_back_a_link_that_points_nowhere(tmp_path):
    (tmp_path / "page.md").symlink_to("nowhere.md")
    with pytest.raises(OSError), files.all_or_none():
        files.atomic_write_text(tmp_path / "page.md", "new\n")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert os.readlink(tmp_path / "page.md") == "nowhere.md" and not _left_behind(tmp_path)


def test_a_file_that_refuses_its_rename_leaves_no_copy_behind(tmp_path, monkeypatch):
    """An immutable file (chattr +i) refuses to be replaced: the block fails, every file is as
    before, and the old version kept for it is not left beside it."""
    for name in ("a.csv", "b.md"):
        (tmp_path / name).write_text(name)
    real = os.replace

    def refusing(src, dst):
        if Path(dst).name == "b.md":
            raise PermissionError(errno.EPERM, "Operation not permitted", str(dst))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", refusing)
    with pytest.raises(PermissionError), files.all_or_none():
        files.atomic_write_text(tmp_path / "a.csv", "new")
        files.atomic_write_text(tmp_path / "b.md", "new")
    assert _folder(tmp_path) == {"a.csv": b"a.csv", "b.md": b"b.md"}


def test_without_hard_links_a_full_disk_leaves_no_cut_copy(full_tmpfs, monkeypatch):
    """A file system without hard links (FAT): the old version is a copy, which a full disk cuts
    short; the block fails with the disk full, and no cut copy is left."""
    def no_links(*args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    (full_tmpfs / "big.csv").write_bytes(b"x" * 200_000)
    before = _folder(full_tmpfs)
    fill(full_tmpfs, 4)
    monkeypatch.setattr(os, "link", no_links)
    with pytest.raises(OSError, match="No space left"), files.all_or_none():
        files.remove(full_tmpfs / "big.csv")
    assert _folder(full_tmpfs).keys() - {".filler"} == before.keys() and not _left_behind(full_tmpfs)


def test_two_processes_updating_one_folder_keep_both_updates(tmp_path):
    """Two processes each read a table, wait, and write it back with their row added, inside
    `updating`: the second waits for the first (saying for whom), so both rows are kept."""
    import subprocess
    import sys

    script = ("import sys, time; from pathlib import Path; from tl.engine import files\n"
              "folder = Path(sys.argv[1]); table = folder / 'rows.csv'\n"
              "with files.updating(folder, 'adding ' + sys.argv[2]):\n"
              "    rows = table.read_text() if table.exists() else ''\n"
              "    time.sleep(1)\n"
              "    files.atomic_write_text(table, rows + sys.argv[2] + '\\n')\n")
    root = Path(__file__).resolve().parents[2]
    children = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), name], cwd=root,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for name in ("a", "b")]
    said = [child.communicate(timeout=60)[0] for child in children]
    assert [child.returncode for child in children] == [0, 0], said
    assert sorted((tmp_path / "rows.csv").read_text().split()) == ["a", "b"]
    assert any("adding" in s for s in said), said  # the one that waited named the holder's command


def test_an_update_inside_this_processs_own_update_of_the_folder_is_part_of_it(tmp_path):
    with files.updating(tmp_path, "outer"), files.updating(tmp_path, "inner"):  # would wait forever on its own lock
        files.atomic_write_text(tmp_path / "a.csv", "a\n")
    assert (tmp_path / "a.csv").read_text() == "a\n"


def _killed_inside_an_update(folder, monkeypatch, kill_at: str, elsewhere: Path | None = None) -> None:
    """A forked process updates `folder` (replaces table.csv and page.md, writes new.csv, removes
    gone.csv) and is killed with SIGKILL at `kill_at`: as its journal is first written, before the
    rename ("journaling"), the moment its first old version is about to be made ("keeping"), after
    the table is replaced ("midway"), or in the tidying after the block was done, with one old
    version removed and one not ("tidying"). `elsewhere`: a file outside the folder it replaces first."""
    import signal

    def kill():
        os.kill(os.getpid(), signal.SIGKILL)

    if kill_at == "keeping":
        monkeypatch.setattr(files, "_link_or_copy", lambda *a: kill())
    if kill_at == "journaling":
        replace = os.replace
        monkeypatch.setattr(os, "replace", lambda src, dst: kill() if str(dst).endswith(".journal") else
                            replace(src, dst))
    if kill_at == "tidying":
        unlink, removed = Path.unlink, []

        def unlink_then_kill(path, missing_ok=False):
            if path.name.endswith(".old"):
                if removed:
                    kill()
                removed.append(path)
            unlink(path, missing_ok=missing_ok)

        monkeypatch.setattr(Path, "unlink", unlink_then_kill)
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            with files.updating(folder, "killed", log=lambda line: None):
                if elsewhere is not None:
                    files.atomic_write_text(elsewhere, "new\n")
                files.atomic_write_text(folder / "table.csv", "new table\n")
                if kill_at == "midway":
                    kill()
                files.atomic_write_text(folder / "page.md", "new page\n")
                files.atomic_write_text(folder / "new.csv", "new\n")
                files.remove(folder / "gone.csv")
        finally:
            os._exit(3)  # not killed where it should have been
    assert os.waitpid(pid, 0)[1] == signal.SIGKILL


OLD = {"table.csv": b"old table\n", "page.md": b"old page\n", "gone.csv": b"gone\n"}
NEW = {"table.csv": b"new table\n", "page.md": b"new page\n", "new.csv": b"new\n"}


@pytest.mark.parametrize("kill_at, after", [("journaling", OLD), ("keeping", OLD), ("midway", OLD), ("tidying", NEW)])
def test_an_update_killed_anywhere_is_finished_or_undone_by_the_next_update(tmp_path, monkeypatch, kill_at, after):
    """A process killed (SIGKILL) inside `updating`: before it changed anything, midway (a new table
    beside the old page), or after its block was done while it removed the old versions. The next
    update of the folder finds its journal and leaves the folder as before the killed update or as
    after it, never a mix; a user's own hidden files that look like old versions or temporaries
    are left alone, whatever process number they seem to name."""
    for name, text in OLD.items():
        (tmp_path / name).write_bytes(text)
    mine = [".notes.md.20240101.draft.old", ".notes.md.123.abcdef12.old", ".x.99999999999999999999.abc.tmp",
            ".mine.tmp", ".results.lock.journal", ".tune.lock.1.abcdef12.journal"]
    for name in mine:
        (tmp_path / name).write_text("the user's own\n")
    with monkeypatch.context() as killing:
        _killed_inside_an_update(tmp_path, killing, kill_at)
    said = []
    with files.updating(tmp_path, "next", log=said.append):
        pass
    found = _folder(tmp_path)
    assert {name: found.pop(name) for name in mine} == {name: b"the user's own\n" for name in mine}
    found.pop(".results.lock")
    assert found == after, (kill_at, found, said)
    assert ("put back" in " ".join(said)) == (kill_at == "midway"), said


def test_a_folder_moved_after_a_killed_update_is_undone_where_it_lies_now(tmp_path, monkeypatch):
    """The journal names its files relative to its folder: a results folder moved (or reached by
    another path) after a killed update is undone where it is now, and a new folder made at the
    old place keeps its files. A file outside the folder (tune's tuned file) is not the folder's
    to undo: it keeps its new version, whole, and its old version is removed."""
    killed, moved, tuned = tmp_path / "results", tmp_path / "moved", tmp_path / "tuned" / "t.json"
    killed.mkdir(), tuned.parent.mkdir()
    tuned.write_text("old\n")
    for name, text in OLD.items():
        (killed / name).write_bytes(text)
    with monkeypatch.context() as killing:
        _killed_inside_an_update(killed, killing, "midway", elsewhere=tuned)
    killed.rename(moved)
    killed.mkdir()
    (killed / "table.csv").write_text("another table\n")
    with files.updating(moved, "next", log=lambda line: None):
        pass
    assert {name: (moved / name).read_bytes() for name in OLD} == OLD and not _left_behind(moved)
    assert (killed / "table.csv").read_text() == "another table\n"
    assert tuned.read_text() == "new\n" and [p.name for p in tuned.parent.iterdir()] == ["t.json"]


def test_old_versions_deleted_by_hand_after_a_killed_update_are_said_not_put_back(tmp_path, monkeypatch):
    """A killed update whose hidden old versions a person deleted: the files it replaced cannot be
    put back, and the next update says which (the new file it made is still removed)."""
    for name, text in OLD.items():
        (tmp_path / name).write_bytes(text)
    with monkeypatch.context() as killing:
        _killed_inside_an_update(tmp_path, killing, "midway")
    for old in tmp_path.glob(".*.old"):
        old.unlink()
    said = []
    with files.updating(tmp_path, "next", log=said.append):
        pass
    assert (tmp_path / "table.csv").read_text() == "new table\n"
    assert [line for line in said if line.startswith("warning: 1 file(s)") and line.endswith(": table.csv")], said


def test_a_journal_is_trusted_only_as_far_as_an_update_could_have_written_it(tmp_path):
    """A journal planted in a results folder (its form exact) that names a file outside the folder
    as new and another file as an old version: the next update removes neither and renames
    nothing over the folder's files."""
    import json

    folder, elsewhere = tmp_path / "results", tmp_path / "elsewhere"
    folder.mkdir(), elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("keep me\n")
    (folder / "table.csv").write_text("the table\n")
    (folder / "mine.old").write_text("not an old version\n")
    planted = {"pid": 1, "done": False, "files": [["../elsewhere/precious.txt", None], [str(elsewhere / "precious.txt"),
                                                  None], ["table.csv", "mine.old"]]}
    (folder / ".results.lock.1.0123abcd.journal").write_text(json.dumps(planted))
    with files.updating(folder, "next", log=lambda line: None):
        pass
    assert (elsewhere / "precious.txt").read_text() == "keep me\n"
    assert (folder / "table.csv").read_text() == "the table\n" and (folder / "mine.old").exists()


@pytest.mark.parametrize("text", ['{"pid": 1, "done": fal', "garbage", '{"done": "no", "files": []}',
                                  '{"done": false, "files": {"a": null}}', '{"done": false, "files": [["a", "x/y"]]}'],
                         ids=["cut short", "garbage", "done not true or false", "files not a list", "old elsewhere"])
def test_a_journal_that_cannot_be_read_stops_the_update_before_the_work_naming_it(tmp_path, text):
    """A journal a person edited or cut short: the files its update changed may be half updated,
    so the folder's next update (and, before any work, writable_folder) stops with one message
    naming the journal, and changes nothing."""
    from tl import TLError

    (tmp_path / "table.csv").write_text("the table\n")
    (tmp_path / ".results.lock.1.0123abcd.journal").write_text(text)
    for attempt in (lambda: files.writable_folder(tmp_path), lambda: files.updating(tmp_path, "next").__enter__()):
        with pytest.raises(TLError, match=r"\.results\.lock\.1\.0123abcd\.journal: the journal .* cannot be read"):
            attempt()
    assert (tmp_path / "table.csv").read_text() == "the table\n"
    assert (tmp_path / ".results.lock.1.0123abcd.journal").read_text() == text


def test_a_folder_that_cannot_be_written_is_found_before_any_result_and_a_good_one_is_left_as_it_was(unwritable,
                                                                                                      tmp_path):
    """writable_folder, which the commands that compute before they write call first: the OSError
    the write would raise (not a folder, a read-only disk, no room), naming the folder, and nothing
    left in a folder that can be written, not even the folder."""
    with pytest.raises(OSError) as caught:
        files.writable_folder(unwritable)
    assert caught.value.errno in (errno.ENOTDIR, errno.EROFS, errno.ENOSPC) and \
        caught.value.filename == str(unwritable), caught.value
    assert not unwritable.exists() or unwritable.is_dir() and not list(unwritable.iterdir())
    good = tmp_path / "made" / "here"
    assert files.writable_folder(good) == good and not (tmp_path / "made").exists()
