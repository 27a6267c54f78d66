"""The folders a command makes, and the promise that a failed command leaves none of them empty.

Every folder the project creates is made by `make` (a `mkdir -p` that remembers which folders
did not exist before). `command` (tl/engine/command.py), the wrapper of every command, runs
its body inside `made_by_this_command`: when the command fails (an `error:` line, Ctrl-C, an
exit status other than 0), the folders it made that are still empty are removed, deepest
first. A folder holding any file stays: a file already written in full is the user's, and nothing half-written is ever
there (tl/engine/files.py). So a full disk or a refused input never leaves an empty
`results/`, `data-preview/` or `lr-finder-...` folder behind.

Importing this module loads neither torch nor numpy (command.py imports it for --help).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

_made: list[Path] = []  # the folders this process made, outermost first, since its command began


def make(path: str | os.PathLike, exist_ok: bool = True) -> Path:
    """`Path(path).mkdir(parents=True, exist_ok=exist_ok)`, noting each folder it creates.
    `exist_ok=False`: the last folder must be new (a run folder that is this run's alone)."""
    path = Path(path)
    missing, part = [], path.absolute()
    while not os.path.lexists(part) and part != part.parent:
        missing.append(part)
        part = part.parent
    path.mkdir(parents=True, exist_ok=exist_ok)
    _made.extend(reversed(missing))
    return path


def made_so_far() -> int:
    """How many folders `make` has noted: what `remove_empty_made(since=...)` counts from."""
    return len(_made)


def remove_empty_made(since: int = 0) -> None:
    """Remove the folders noted by `make` (from the `since`-th on) that are empty now, deepest
    first, and forget them."""
    for folder in reversed(_made[since:]):
        with contextlib.suppress(OSError):  # not empty, gone already, or not ours to remove any more
            folder.rmdir()
    del _made[since:]


@contextlib.contextmanager
def made_by_this_command() -> Iterator[list]:
    """While the block runs, the folders `make` creates are the command's: if the block raises, or
    puts an exit status other than 0 in the list it is given, the empty ones are removed. A
    command that succeeds keeps them all. (A command inside another answers for its own folders.)"""
    since, status = len(_made), []
    try:
        yield status
        if any(status):
            remove_empty_made(since)
    except BaseException:
        remove_empty_made(since)
        raise
    finally:
        del _made[since:]
