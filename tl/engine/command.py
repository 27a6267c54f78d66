"""The promise every command makes at its end: a problem is one `error: ...` line and exit status 2.

`command(main)` runs a command's body and keeps that promise for main.py, every study run
as `python -m experiments.NAME` and every benchmark (`python -m benchmarks.NAME`): the
one place that turns an exception into a message and an exit status.

* A `TLError` (bad input: a name, a value, a damaged file) prints its message.
* An `OSError` is the machine or the user's files speaking (a full disk, no permission, a
  read-only file system, a file where a folder should be): `message` says what to change.
  Every file is written atomically (tl/engine/files.py), so a write that fails leaves the
  old file or none, never an empty or half-written one.
* Ctrl-C (`KeyboardInterrupt`, or `tl.Interrupted` from a training run) exits with 130, the
  shell's status for an interrupt, after one line saying so.

With `TL_DEBUG=1` in the environment the exception is raised instead: the developer's view,
with the full traceback. Importing this module loads neither torch nor numpy, so `--help`
stays quick.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable

from tl import Interrupted, TLError

INTERRUPTED = 130  # the shell's exit status for Ctrl-C (128 + SIGINT)


def command(main: Callable[[], int | None], interrupted: str = "interrupted") -> int:
    """`main()`'s exit status (None counts as 0), or 2 after one `error:` line for a TLError or
    an OSError, or 130 after `error: <interrupted>` for Ctrl-C (`interrupted` says what was
    left as it was)."""
    try:
        return main() or 0
    except (TLError, OSError) as exc:
        if os.environ.get("TL_DEBUG"):
            raise
        print(f"error: {message(exc)}", file=sys.stderr)
        return INTERRUPTED if isinstance(exc, Interrupted) else 2  # Ctrl-C in training: where it stopped
    except KeyboardInterrupt:
        if os.environ.get("TL_DEBUG"):
            raise
        print(f"error: {interrupted}", file=sys.stderr)
        return INTERRUPTED


def message(exc: TLError | OSError) -> str:
    """The one-line (or few-line) text for a TLError or an OSError from the user's files.

    An OSError is the environment speaking (permissions, space, a file where a folder
    should be): it is the user's to fix, so it gets a message too, never a traceback."""
    if isinstance(exc, TLError):
        text = str(exc)
        if text.startswith("Caught TLError in DataLoader worker"):
            # a worker process's error comes back with the worker's traceback in its text: keep our message
            text = text.rsplit("TLError: ", 1)[-1].strip()
        return text
    where = exc.filename or "a file"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        full = "no space left on the device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
        return f"{full} while writing {where}: free some space, or use --out / TL_CACHE_DIR on another disk"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: {where}: make it readable (and writable, for outputs) or choose another path"
    if exc.errno == errno.EROFS:
        return f"read-only file system: {where}: choose a writable --out (or TL_CACHE_DIR)"
    if exc.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return f"{exc.strerror}: {where}: a file stands where a folder is needed (or the reverse); choose another path"
    return f"{exc.strerror or exc}: {where}; check the path and the disk".replace("\n", " ")
