"""Writing files that are never seen half-written, and the digest that tells two states apart.

Every write goes to a temporary file in the same folder, is flushed to disk, and is
then renamed over the target: a rename is atomic, so a run killed at any instant
leaves either the old file or the new one, never half of one. (A kill between the
write and the rename leaves the temporary `.NAME.*.tmp`; `remove_stale_temporaries`
clears it when the run folder is next used.)

A written file gets the mode of any other file the user creates: the temporary is
created with 0o666, which the kernel trims by the process's umask (0644 under the usual
umask 022, 0640 under 027). The umask is never read or set here.

One file at a time is not enough for a folder whose files describe one result together (a
table, its picture and the page that cites both): a disk that fills up at the last of them
would leave a new table beside an old page. Inside `all_or_none()`, every file written or
removed keeps its old version (a hard link beside it) until the block ends; when the block
fails, each is put back by renames, which need no room on the disk. A process killed inside the
block cannot do that itself: an update of a shared folder (`updating`) writes a journal first, and
the next update of the folder finishes or undoes what the journal says (`finish_cut_off`).

Atomic is not the same as intact: a disk or a copy can still flip bits inside a
file that loads without complaint. So a checkpoint (tl/engine/checkpoint.py) carries a
SHA-256 digest of its contents (`state_digest`), and a run's config.json records the
digest of each weight file it wrote.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from tl.engine import folders
from tl.engine.class_names import one_line
from tl.engine.folder_lock import still_held


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call `write(f)` on a temporary file beside `path`, fsync, then rename onto `path`.

    The one way this project writes a file: weights, checkpoints, feature caches, tables,
    pictures, exported models, the studies' and benchmarks' pages all go through it. When
    any step fails (a full disk, a quota, an I/O error), the temporary is removed and the
    error is raised as an OSError naming `path`: the old file stays as it was, or there is
    none, never an empty or half-written one. In a folder this process holds
    (tl/engine/folder_lock.py), nothing is written once its lock file was taken away."""
    path = Path(path)
    still_held(path)
    try:
        fd, tmp = temporary_beside(path, mode=0o666)  # the user's umask gives the mode (see the module docstring)
    except OSError as exc:
        if exc.filename is None or not Path(exc.filename).name.startswith(f".{path.name}."):
            raise  # a folder that cannot be made names itself
        raise OSError(exc.errno, exc.strerror, str(path)) from exc  # the message names the target, not the temporary
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        _keep_old(path)
        os.replace(tmp, path)
    except BaseException as exc:
        # torch.save reports a failed write (disk full, I/O error) as a RuntimeError of its zip
        # writer; the free space is measured while the partial file still holds its blocks
        failed_save = isinstance(exc, RuntimeError) and "inline_container" in str(exc)
        free = shutil.disk_usage(path.parent).free if failed_save else None
        Path(tmp).unlink(missing_ok=True)
        if failed_save:
            # the OSError underneath (disk full, quota exceeded, I/O error) keeps its errno;
            # without one, a disk with under 1 MiB left is taken to be full
            code = getattr(exc.__context__, "errno", None) or (errno.ENOSPC if free < 2**20 else errno.EIO)
            raise OSError(code, f"writing failed ({free / 2**20:.1f} MB free there)", str(path)) from None
        if isinstance(exc, OSError) and exc.filename in (None, str(tmp)):
            # a failed write names no file, a failed rename the temporary: the message names the target
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    return path


@dataclasses.dataclass
class _Block:
    """What an all_or_none block has changed: each file's old version (None where the file is new)."""

    old: dict[Path, Path | None] = dataclasses.field(default_factory=dict)
    emptied: list[Path] = dataclasses.field(default_factory=list)  # folders to remove if the block leaves them empty
    journal: Path | None = None  # where the block writes down what it changes (`all_or_none(journal=...)`)
    token: str = dataclasses.field(default_factory=lambda: secrets.token_hex(4))
    inode: dict[Path, int] = dataclasses.field(default_factory=dict)  # each changed file's before the block

    def write_journal(self, done: bool = False) -> None:
        """The journal: the files of its folder the block changes, named relative to the folder (so
        a folder moved or reached by another path still finds them). A file elsewhere is not its to
        undo: only its old version is listed ("elsewhere"), to be removed."""
        if self.journal is not None:
            folder = os.path.realpath(self.journal.parent)
            files = [[os.path.relpath(_real(p), folder), None if o is None else o.name, self.inode.get(p)]
                     for p, o in self.old.items() if _inside(p, folder)]
            elsewhere = [_real(o) for p, o in self.old.items() if o is not None and not _inside(p, folder)]
            write_json(self.journal, {"done": done, "files": files, "elsewhere": elsewhere})  # its name holds the pid


_block: _Block | None = None  # the all_or_none block running now, if any


@contextlib.contextmanager
def all_or_none(journal: Path | None = None):
    """The files written (`atomic_write`) and removed (`remove`) in this block change together
    or not at all: if the block raises (a full disk, Ctrl-C), each is put back as it was before
    the block. A block inside another is part of it.

    A process killed inside the block (SIGKILL, a power cut) cannot put anything back itself.
    With `journal` (`FOLDER/LOCK`, a lock the caller holds: `updating`), the block writes down,
    in `FOLDER/.LOCK.PID.XXXXXXXX.journal`, each file of FOLDER before it changes it and where its
    old version is kept, and marks the journal done once every file is in place: the next holder of
    the lock finishes what a journal says (`finish_cut_off`), putting back the files of a block
    that was not done, and only removing the old versions of one that was. (A file outside FOLDER
    is not the lock's to undo: a killed block leaves it whole, as atomic_write does.)"""
    global _block
    if _block is not None:
        yield
        return
    block = _block = _Block()
    if journal is not None:  # FOLDER/.LOCK -> FOLDER/.LOCK.PID.XXXXXXXX.journal
        journal = Path(journal)
        block.journal = journal.with_name(f".{journal.name.lstrip('.')}.{os.getpid()}.{block.token}.journal")
    try:
        yield
        block.write_journal(done=True)  # the moment the block counts as done: one rename
    except BaseException:
        _put_back(block.old)
        _remove_journal(block)
        raise
    else:
        for old in block.old.values():
            if old is not None:
                old.unlink(missing_ok=True)
        _remove_journal(block)
        for folder in block.emptied:
            with contextlib.suppress(OSError):  # not empty: it keeps what it holds
                folder.rmdir()
    finally:
        _block = None


def _put_back(changed: dict[Path, Path | None]) -> list[Path]:
    """Each changed file as it was: its old version renamed back (a rename needs no room), or
    removed where there was none. The files put back."""
    back = []
    for path, old in reversed(changed.items()):
        with contextlib.suppress(OSError):  # one that cannot be put back does not stop the others
            if old is None and os.path.lexists(path):
                path.unlink()
                back.append(path)
            elif old is not None and os.path.lexists(old):
                os.replace(old, path)
                back.append(path)
        if old is not None:
            old.unlink(missing_ok=True)  # not put back (its file refused the rename): no copy left behind
    return back


def _remove_journal(block: _Block) -> None:
    if block.journal is not None:
        block.journal.unlink(missing_ok=True)


def finish_cut_off(journal: Path, log=print) -> list[Path]:
    """Finish the all_or_none blocks that processes killed inside them left (their journals
    `FOLDER/.LOCK.PID.XXXXXXXX.journal`; the caller holds `FOLDER/LOCK`, so none of them still
    runs): a block that was done loses only its old versions; one that was not gets every file it
    changed put back, the newest block first, so the oldest state wins. The files put back."""
    journal = Path(journal)
    found = sorted(journals(journal.parent, journal.name), key=lambda f: f[0].stat().st_mtime, reverse=True)
    back, gone = [], []
    for path, done, changed, elsewhere, inode in found:
        if done:
            for old in (o for o in changed.values() if o is not None):
                old.unlink(missing_ok=True)
        else:  # a file whose old version is gone was changed if it no longer is the file it was
            gone += [p for p, o in changed.items() if o is not None and not os.path.lexists(o)
                     and not (os.path.lexists(p) and os.lstat(p).st_ino == inode.get(p))]
            back += _put_back(changed)
        for old in elsewhere:
            old.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
    if back:
        log(f"put back {len(back)} file(s) that an update cut off midway had changed: "
            + ", ".join(one_line(p.name) for p in back[:5]))
    if gone:  # their old versions were deleted by hand
        log(f"warning: {len(gone)} file(s) that an update cut off midway had changed have no old version left "
            f"to put back (deleted?): they stay as they are now: "
            + ", ".join(one_line(p.name) for p in gone[:5]))
    return back


def journals(folder: Path, lock: str = "*") -> list[tuple]:
    """The journals in `folder` of updates under `lock` (any lock: "*"): each one's path, whether
    its block was done, the files of FOLDER it changed with their old versions, the old versions it
    kept of files elsewhere, and the inode each changed file had before the block. A journal is
    trusted only as far as this module could have written it (a file in FOLDER; an old version
    bearing the journal's process id and token, beside its file); one that cannot be read is a
    TLError naming it."""
    from tl import TLError

    lock = re.escape(lock.lstrip(".")) if lock != "*" else ".+"
    form = re.compile(rf"\.{lock}\.(\d+)\.([0-9a-f]{{8}})\.journal")
    found = []
    for path in (p for p in folder.iterdir() if p.is_file()):
        if not (match := form.fullmatch(path.name)):
            continue
        pid, token = match.groups()
        try:
            record = json.loads(path.read_text())
            done = record["done"]
            changed = {folder / p: None if o is None else (folder / p).with_name(o) for p, o, *_ in record["files"]}
            inode = {folder / p: (more or [None])[0] for p, _, *more in record["files"]}
            elsewhere = [Path(o) for o in record.get("elsewhere", [])]
            if not isinstance(done, bool):
                raise TypeError(done)
        except (OSError, ValueError, KeyError, TypeError):
            raise TLError(f"{path}: the journal of an update cut off midway cannot be read, so the files it changed "
                          f"in {folder} may be half updated: check them, then delete the journal") from None
        ours = re.compile(rf"\..+\.{pid}\.{token}\.old", re.DOTALL)
        found.append((path, done, {p: o for p, o in changed.items() if _inside(p, folder) and (
            o is None or o == p.with_name(f".{p.name}.{pid}.{token}.old"))},
            [o for o in elsewhere if o.is_absolute() and ours.fullmatch(o.name)], inode))
    return found


def _inside(path: Path, folder: Path) -> bool:
    return _real(path).startswith(os.path.realpath(folder) + os.sep)


def _real(path: Path) -> str:
    """`path` with its folder's links and `..` resolved (not a link it may itself be)."""
    return os.path.join(os.path.realpath(path.parent), path.name)


RESULTS_LOCK = ".results.lock"  # the lock of a results folder that several commands update (tl/engine/folder_lock.py)
_UPDATING: set[tuple[Path, str]] = set()  # the folders (and locks) this process is updating now


@contextlib.contextmanager
def updating(folder: Path, command: str, lock: str = RESULTS_LOCK, note: str = "", log=print):
    """Update the shared files of `folder` (a table several commands add rows to, a page several
    write sections of): one process at a time (a second one waits for the lock, saying for whom),
    and all the block's files or none (`all_or_none`). Read what the block merges inside it, so
    that no other process's rows are lost between the read and the write."""
    from tl.engine.folder_lock import hold

    key = (Path(folder).resolve(), lock)
    if key in _UPDATING:  # inside this process's own update of the folder: part of it (its lock would wait forever)
        yield
        return
    folders.make(folder)
    with hold(folder, lock, wait=True, command=command, note=note, log=log):
        finish_cut_off(Path(folder) / lock, log)  # an update killed midway (SIGKILL, a power cut) is undone first,
        remove_stale_temporaries(folder)  # and the temporaries it left go
        with all_or_none(journal=Path(folder) / lock):
            _UPDATING.add(key)
            try:
                yield
            finally:
                _UPDATING.discard(key)


def writable_folder(folder: str | os.PathLike, room: int = 2**20) -> Path:
    """`folder`, tried with a file made and removed in it (and the folders made for it removed
    again): a command that computes for minutes or hours before it writes its results calls this
    first, so a folder that cannot be written (read-only, not a folder, no permission, under
    `room` bytes free: 1 MiB, less than a page and its pictures take) stops it at once with the
    OSError the write would have raised (tl/engine/command.py says it in one line)."""
    folder, made_before = Path(folder), folders.made_so_far()
    try:
        fd, probe = temporary_beside(folder / RESULTS_LOCK)
        os.close(fd)
        probe.unlink()
        free = shutil.disk_usage(folder).free
    except OSError as exc:  # the message names the folder, not the file that tried it
        raise OSError(exc.errno, exc.strerror, str(folder)) from None
    finally:
        folders.remove_empty_made(since=made_before)
    if free < room:
        raise OSError(errno.ENOSPC, f"{free / 2**10:.0f} KiB free", str(folder))
    if folder.is_dir():
        journals(folder)  # a journal that cannot be read would stop the update: said now, before the work
    return folder


def _keep_old(path: Path) -> None:
    """In an all_or_none block, keep `path`'s version from before the block (the first time the
    block changes it): a hard link `.NAME.PID.XXXXXXXX.old` beside it, or a copy where the file
    system has no hard links, written down in the block's journal before it is made."""
    block = _block
    if block is None or path in block.old or path == block.journal:
        return
    exists = os.path.lexists(path)  # a link that points nowhere is kept too
    block.old[path] = path.with_name(f".{path.name}.{os.getpid()}.{block.token}.old") if exists else None
    if exists:
        block.inode[path] = os.lstat(path).st_ino  # a replaced or removed file no longer has it
    block.write_journal()
    if exists:
        _link_or_copy(path, block.old[path])


def _link_or_copy(path: Path, other: Path) -> None:
    """A second name `other` for `path`'s contents, made without copying where the file system allows."""
    try:
        os.link(path, other, follow_symlinks=False)  # a symbolic link is kept as the link
    except OSError as exc:
        if isinstance(exc, FileExistsError):
            raise
        try:  # no hard links here (FAT, some network file systems): a copy, which needs room
            shutil.copy2(path, other, follow_symlinks=False)
        except BaseException:
            other.unlink(missing_ok=True)  # a copy cut short by a full disk is not left behind
            raise


def remove(path: str | os.PathLike) -> None:
    """Delete `path` (in an all_or_none block: put back if the block fails), and its folder at
    the block's end if that leaves it empty."""
    path = Path(path)
    _keep_old(path)
    path.unlink(missing_ok=True)
    if _block is not None:
        _block.emptied.append(path.parent)
    elif not any(path.parent.iterdir()):
        path.parent.rmdir()


def temporary_beside(path: str | os.PathLike, mode: int = 0o600) -> tuple[int, Path]:
    """A new empty file `.NAME.PID.XXXXXXXX.tmp` in `path`'s folder (created if needed): its
    open descriptor and its path. The writer's process id is in the name, so a dead writer's
    leftover is told by its name (`remove_stale_temporaries`). `mode` is trimmed by the umask,
    as for any new file: 0o600 (the default, as `tempfile.mkstemp`) is the owner's alone."""
    path = Path(path)
    folders.make(path.parent)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, flags, mode)
            break
        except FileExistsError:
            continue  # a name drawn twice: draw again
    else:
        raise FileExistsError(errno.EEXIST, "no free temporary name", str(path.parent))
    return fd, tmp


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save(obj)` through `atomic_write`."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    # backslashreplace: a file name that is not valid UTF-8 is written as \xNN, not a crash
    return atomic_write(path, lambda f: f.write(text.encode("utf-8", "backslashreplace")))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_copy(src: str | os.PathLike, path: str | os.PathLike) -> Path:
    """The bytes of `src` as the file `path`, through `atomic_write`. (`shutil.copyfile` writes
    the target in place: a disk that fills up meanwhile leaves it empty or cut short.)"""
    with open(src, "rb") as source:
        return atomic_write(path, lambda f: shutil.copyfileobj(source, f, 2**20))


def write_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the `.NAME.PID.*.tmp` files that a killed `atomic_write` left in `folder`:
    those whose writing process no longer exists. A live process's file is left alone, so
    this is safe on a folder several runs share (the feature cache)."""
    stale = []
    for p in Path(folder).glob(".*.tmp"):
        written_by = re.fullmatch(r"\..+\.(\d+)\.[0-9a-f]{8}\.tmp", p.name, re.DOTALL)  # a user's own
        if written_by and p.is_file() and not _alive(int(written_by[1])):  # hidden .tmp file is left alone
            p.unlink(missing_ok=True)
            stale.append(p)
    return stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except (ProcessLookupError, OverflowError):  # none by that number (or a number no process can have)
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


def state_digest(obj: Any) -> str:
    """SHA-256 of a nested structure of tensors and plain values, independent of how it was
    stored: dict keys in sorted order, each tensor as its dtype, shape and raw bytes. Two
    objects get the same digest exactly when a training run could not tell them apart."""
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            # the bytes are hashed where they lie (no copy): a memory-mapped feature cache is
            # streamed through page by page instead of being read into memory
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(x, dict):
            h.update(b"{")
            for k in sorted(x, key=repr):
                h.update(repr(k).encode())
                feed(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                feed(v)
            h.update(b"]")
        else:
            h.update(repr(x).encode())

    feed(obj)
    return h.hexdigest()
