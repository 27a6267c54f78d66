"""One writer per folder: an exclusive lock on a file inside it that names its holder.

`hold(folder, name, wait=...)` takes an exclusive `fcntl.flock` on `folder/name` for as
long as the block runs, and writes into that file who holds it: the process id, its
command, its machine and since when. A second process that asks for the same folder reads
that line and either waits for it (`wait=True`, saying for whom it waits) or stops at once
with a `FolderBusy` error that names the holder (`wait=False`). Its users:

* a run folder (tl/engine/run_folder.py) is held by its run from the moment it is made or
  reopened by --resume until the run ends; a second writer stops (two resumes of one run
  at once are a mistake, and the one that waited would continue from a stale checkpoint);
* a comparison's results folder (experiments/compare_all.py) is held while its tables are
  written; a second comparison waits its turn, then merges its rows with the other's.

The lock goes with the process: the kernel releases it when the process ends, however it
ends (a crash, `kill -9`), so a killed holder never leaves a folder locked. A `flock` belongs
to the open file, which `fork` shares with the child, so a forked child (a DataLoader
worker) would keep a killed parent's lock for as long as it lives, and could release it
while the parent still writes: a forked child closes its copies as its first act
(`_forget_in_child`). The lock file itself stays in the folder, empty when no one holds
it.

A lock file deleted (or replaced) by hand while its holder runs would let a second process
take a new lock file of the same name, and two processes would write one folder. The holder
cannot stop that, but it notices: every write (tl/engine/files.py `atomic_write`) into a
folder this process holds first checks `still_held` (the lock file at its path is still the
file this process locked), and stops with `LockLost` before writing anything more, leaving
the folder to the other process.

On a file system without working `flock` (some network mounts) the lock may be granted to
both writers. On Windows (no `fcntl`) folders are not locked: `hold` runs the block at once,
and two writers of one folder are not stopped.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
import stat
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from tl import TLError

_HELD: dict[Path, IO] = {}  # the lock files this process holds now, open


def _forget_in_child() -> None:
    """In a forked child: close this process's copies of its parent's lock files (closing
    one copy leaves the parent's lock in place; only an unlock or the last close ends it)."""
    for f in _HELD.values():
        f.close()
    _HELD.clear()


if hasattr(os, "register_at_fork"):  # Unix
    os.register_at_fork(after_in_child=_forget_in_child)


class FolderBusy(TLError):
    """Another process holds the folder's lock (its message names that process)."""


class LockLost(TLError):
    """The lock file of a folder this process holds was removed or replaced: another process
    may be writing the folder now, so this one writes nothing more there."""


def this_command() -> str:
    """The command line of this process, as it was typed (`python main.py --resume ...`)."""
    return shlex.join(getattr(sys, "orig_argv", None) or [os.path.basename(sys.executable), *sys.argv])


def held_here(folder: Path, name: str) -> bool:
    """Whether this process holds `folder`'s lock `name` (taken by `hold`, not yet released)."""
    return (Path(folder) / name).absolute() in _HELD


def still_held(target: str | os.PathLike) -> None:
    """Before a write to `target`: for each folder this process holds that contains `target`, the
    lock file at its path must still be the file this process locked, else `LockLost`."""
    target = Path(target).absolute()
    for path, f in list(_HELD.items()):
        if path.parent not in target.parents:
            continue
        mine = os.fstat(f.fileno())
        try:
            now = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            now = None
        if now is None or (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
            raise LockLost(f"the lock file {path} was removed or replaced while this process wrote "
                           f"{path.parent}, so another process may be writing it now; this process stops "
                           f"without writing {target.name}: run one process per folder")


def _open_lock_file(path: Path):
    """The lock file for reading and appending (an existing file, and its holder's line, are kept),
    never through a link: the lock truncates its file, and a link would make that another file."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0),
                     0o666)
    except OSError:
        if os.path.islink(path):
            raise TLError(f"{path} is a link; a lock file must be a plain file: remove the link") from None
        if os.path.lexists(path) and not (os.path.isdir(path) or os.path.isfile(path)):  # a socket: no open
            raise TLError(f"{path} is not a plain file; a lock file must be one: remove it") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO, a device: nothing a holder's line can be kept in
        os.close(fd)
        raise TLError(f"{path} is not a plain file; a lock file must be one: remove it")
    return os.fdopen(fd, "a+")


@contextlib.contextmanager
def hold(folder: Path, name: str, *, wait: bool, command: str | None = None, note: str = "",
         log: Callable[[str], None] = print) -> Iterator[None]:
    """Run the block while this process alone holds `folder/name` (see the module docstring).

    `wait`: True waits for the holder to finish (saying so through `log`), False raises
    `FolderBusy` at once, naming it, and writes nothing. `command`: what the lock file says
    this process runs (default: its command line); `note` ends the line that says it waits.
    A second `hold` of the same lock inside
    this process counts as another writer: it waits for, or stops at, the first."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock (see the module docstring)
        yield
        return
    folder = Path(folder)
    path = (folder / name).absolute()
    created = not os.path.lexists(path)
    with _open_lock_file(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(f)
            if not wait:
                raise FolderBusy(f"{folder} is being written by {holder}; one process writes it at a time: "
                                 f"wait until that one has finished, or stop it") from None
            log(f"{folder} is being written by {holder}; waiting for it to finish{note}")
            fcntl.flock(f, fcntl.LOCK_EX)
            log(f"{folder} is free: writing")
        try:  # unbuffered: a failed write leaves nothing for the file's close to try again
            f.truncate(0)
            os.write(f.fileno(), f"process {os.getpid()} ({command or this_command()}; on {socket.gethostname()}, "
                                 f"since {time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode())
        except OSError as exc:  # a full disk: the message names the lock file, which goes if it was new
            if created:
                path.unlink(missing_ok=True)
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        _HELD[path] = f
        try:
            yield
        finally:
            _HELD.pop(path, None)
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


def _holder(f) -> str:
    """The line the holder wrote into the lock file (it writes it just after it takes the lock)."""
    for _ in range(20):
        f.seek(0)
        if line := f.read().strip():
            return line
        time.sleep(0.1)
    return "another process"
