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
  shell's status for an interrupt, after one line saying so. SIGTERM (what `kill`, `timeout`
  and job schedulers send) is taken the same way, so a run stopped by it tidies up as after
  Ctrl-C, and exits with 143 (128 + SIGTERM), also where the signal reaches the DataLoader's
  worker processes as well (a job scheduler stops every process of the job).
* A path that is not valid UTF-8 (a file name from another system) is printed with its odd
  bytes escaped (\\udcNN), never a UnicodeEncodeError; a name holding a line feed or a terminal
  escape is printed with it escaped (\\n, \\x1b), so the error stays one line (`shown`); on
  stdout, a name's colour escape, carriage return or bidi mark is shown as its escape too, so
  no name drives the terminal. A line feed is shown as \\n where it lies inside a folder or
  file name given on the command line (the data folder, --out), so a line that names the
  folder or what is made from it (a run folder, a study) stays one line.
* The folders a failed command made and left empty are removed (tl/engine/folders.py).
* What to change when a write fails names the option whose path holds the file (`--runs-dir`,
  `--tuned-dir`, `--csv`, ...), else the command's own place for its outputs (`outputs`: `--out`,
  `--dest`, or a sentence such as "copy the run folder ..."), or TL_CACHE_DIR for a file in the cache.

With `TL_DEBUG=1` in the environment the exception is raised instead: the developer's view,
with the full traceback. Importing this module loads neither torch nor numpy, so `--help`
stays quick.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator

from tl import Interrupted, TLError
from tl.engine.class_names import CONTROL, one_line
from tl.engine.folders import made_by_this_command


def command(main: Callable[[], int | None], interrupted: str = "interrupted", outputs: str = "--out",
            argv: list[str] | None = None) -> int:
    """`main()`'s exit status (None counts as 0), or 2 after one `error:` line for a TLError or
    an OSError, or 130 after `error: <interrupted>` for Ctrl-C (`interrupted` says what was
    left as it was; 143 for SIGTERM). `outputs`: where the user chooses the command's outputs;
    `argv`: the command line's arguments (default sys.argv[1:])."""
    stopped_by = [signal.SIGINT]
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 prints escaped, not a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        given = sys.argv[1:] if argv is None else argv
        with interrupts_noted(stopped_by), _stdout_escaped(given), made_by_this_command() as status:
            status.append(main() or 0)  # a failure leaves no empty folder
        return status[0]
    except (TLError, OSError) as exc:
        if os.environ.get("TL_DEBUG"):
            raise
        say_error(message(exc, outputs))
        return 128 + stopped_by[-1] if isinstance(exc, Interrupted) else 2  # Ctrl-C in training: where it stopped
    except (KeyboardInterrupt, Exception) as exc:  # after a signal, what failed failed of it (a DataLoader
        if os.environ.get("TL_DEBUG") or not (isinstance(exc, KeyboardInterrupt) or len(stopped_by) > 1):
            raise  # worker it ended while the interrupt was swallowed): said as the interrupt
        print(f"error: {interrupted}", file=sys.stderr)
        return 128 + stopped_by[-1]


class _Escaped:
    """A text stream that shows each control character but the line feed and the tab as its
    escape (\\x1b, \\r, \\u202e): what a command prints names the user's files and folders, and
    a name's colour escape or carriage return must not drive the terminal. A line feed is the
    command's own line break, except inside one of `names` (those given on the command line
    that hold one): there it is shown as \\n too."""

    def __init__(self, stream, names: list[str] = ()):
        self.stream = stream
        self.names = sorted(names, key=len, reverse=True)  # a longer name first: it may hold a shorter one

    def write(self, text: str) -> int:
        for name in self.names:
            text = text.replace(name, one_line(name))
        return self.stream.write(_NOT_A_LINE_BREAK.sub(lambda m: one_line(m.group()), text))

    def __getattr__(self, name):
        return getattr(self.stream, name)


_NOT_A_LINE_BREAK = re.compile(r"(?![\n\t])" + CONTROL.pattern)


def _names_with_line_feeds(argv: list[str]) -> set[str]:
    """Each folder or file name in `argv`'s arguments (`--out=DIR` counts as DIR) that holds a line
    feed. A line feed at a name's end is matched only where a path separator follows it (and at its
    start only where one comes before): "runs\\n" alone would match the command's own line breaks."""
    values = (arg.partition("=")[2] if arg.startswith("--") else arg for arg in map(str, argv))
    return {("/" if name.startswith("\n") else "") + name + ("/" if name.endswith("\n") else "")
            for value in values for name in value.split("/") if "\n" in name}


@contextlib.contextmanager
def _stdout_escaped(argv: list[str]) -> Iterator[None]:
    """While the block runs, what it prints on stdout goes through `_Escaped`."""
    before = sys.stdout
    sys.stdout = _Escaped(before, _names_with_line_feeds(argv))
    try:
        yield
    finally:
        sys.stdout = before


# ----------------------------------------------------------------------------- an interrupt is never lost
class _Noted:
    """The interrupt (SIGINT or SIGTERM) noted while a command runs, and when (time.monotonic);
    `lists`: the `stopped_by` lists of the `interrupts_noted` blocks open now (none: no block
    has set the handlers)."""

    signum: int | None = None
    at: float = 0.0
    lists: list = []


REPEAT_S = 1.0  # a second signal this soon after the first is the same request to stop


@contextlib.contextmanager
def interrupts_noted(stopped_by: list | None = None) -> Iterator[None]:
    """While the block runs, Ctrl-C and SIGTERM (what `kill`, `timeout` and job schedulers send)
    are noted (appended to `stopped_by`), then raise KeyboardInterrupt; the handlers before
    come back afterwards. Only the main thread can set them; a block inside another only
    notes the signal in its list too.

    * Python raises a signal's exception wherever the program is, and one raised where Python
      ignores exceptions (a garbage collector's callback, an `os.fork` hook as a DataLoader
      starts its workers) is swallowed, printed as "Exception ignored". With the note the
      command stops all the same: `stop_if_interrupted` raises it again where a run or a
      search is sure to pass (after each epoch, each trial). Once a signal is noted, what
      Python would print as "Exception ignored" is left out: it failed of the interrupt (an
      object the interrupt left half-built, ended as the block ends).
    * A second signal within REPEAT_S of the first is the same request (several quick Ctrl-C
      presses, a scheduler's SIGTERM to each process), so it does not break the tidying-up.
    * SIGTERM reaches every process of a job (Slurm's scancel, a service manager, `kill --
      -PGID`), the DataLoader's worker processes too, and they die of it. Once a signal is
      noted, the main process stops watching its workers (PyTorch's SIGCHLD handler raises a
      RuntimeError for a dead one), and an error that follows is the signal's doing: the run
      and the command say the interrupt (`noted_signal`), not the error. A worker forked a
      moment ago, still with this handler, ends quietly. (A worker signalled well before the
      main process still shows PyTorch's traceback.)
    * Ctrl-C whose handler is not Python's (ignored, as in a background job) stays as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _Noted.lists:
        _Noted.lists.append(stopped_by if stopped_by is not None else [])
        try:
            yield
        finally:
            _Noted.lists.pop()
        return
    pid = os.getpid()

    def handler(signum, frame):
        if os.getpid() != pid:
            os._exit(0)  # a DataLoader worker before its own handler is set
        if _Noted.signum is not None and time.monotonic() - _Noted.at < REPEAT_S:
            return  # the same request: the first signal is the one said and counted
        _Noted.signum, _Noted.at = signum, time.monotonic()
        for noted in _Noted.lists:
            noted.append(signum)
        signal.signal(signal.SIGCHLD, _workers_end_with_us)  # PyTorch's handler would raise as we stop
        raise KeyboardInterrupt

    handlers = {n: signal.getsignal(n) for n in (signal.SIGINT, signal.SIGTERM)}
    hook, _Noted.signum, _Noted.lists = sys.unraisablehook, None, [stopped_by if stopped_by is not None else []]
    for n, before in handlers.items():
        if n == signal.SIGTERM or callable(before):
            signal.signal(n, handler)
    sys.unraisablehook = lambda u: None if _Noted.signum else hook(u)
    try:
        yield
        stop_if_interrupted()  # noted in the block's last moments
    finally:
        if _Noted.signum is not None and (stopping := sys.exc_info()[1]) is not None:
            traceback.clear_frames(stopping.__traceback__)  # what the interrupt left half-built ends now, and
            gc.collect()  # what it says as it ends (a DataLoader's iterator stopped in its __init__) is not shown
        sys.unraisablehook, _Noted.signum, _Noted.lists = hook, None, []
        for n, before in handlers.items():
            signal.signal(n, before)


def _workers_end_with_us(signum, frame) -> None:
    """SIGCHLD once the command is stopping: a DataLoader worker's end is no error to raise."""


def stop_if_interrupted(*_) -> None:
    """Raise KeyboardInterrupt where an interrupt was noted (`interrupts_noted`), wherever its
    own exception went; also Optuna's callback after each trial (study, trial)."""
    if _Noted.signum is not None:
        raise KeyboardInterrupt


def noted_signal() -> int | None:
    """The signal that asked the command to stop (`interrupts_noted`), or None."""
    return _Noted.signum


def is_interrupt(exc: BaseException) -> bool:
    """Whether `exc` is how the interrupt shows: its KeyboardInterrupt, or anything raised once a
    signal is noted (what failed then failed of it)."""
    return isinstance(exc, KeyboardInterrupt) or _Noted.signum is not None


def message(exc: TLError | OSError, outputs: str = "--out") -> str:
    """The one-line (or few-line) text for a TLError or an OSError from the user's files.

    An OSError is the environment speaking (permissions, space, a file where a folder
    should be): it is the user's to fix, so it gets a message too, never a traceback.
    `outputs`: the option that chooses where the command writes (`--out`, `--dest`)."""
    if isinstance(exc, TLError):
        text = str(exc)
        if text.startswith("Caught TLError in DataLoader worker"):
            # a worker process's error comes back with the worker's traceback in its text: keep our message
            text = text.rsplit("TLError: ", 1)[-1].strip()
        return text
    where = exc.filename or "a file"
    elsewhere = "TL_CACHE_DIR" if _in_cache(exc.filename) else (
        outputs if not outputs.startswith("--") else _option_holding(exc.filename) or outputs)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        full = "no space left on the device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
        return f"{full} while writing {where}: free some space, or write to another disk ({elsewhere})"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: {where}: make it readable (and writable, for outputs) or choose another path"
    if exc.errno == errno.EROFS:
        return f"read-only file system: {where}: write to a writable place instead ({elsewhere})"
    if exc.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return f"{exc.strerror}: {where}: a file stands where a folder is needed (or the reverse); choose another path"
    return f"{exc.strerror or exc}: {where}; check the path and the disk".replace("\n", " ")


def say_error(text: str) -> None:
    """Print the one `error:` line (and its own advice lines) on stderr, names in it shown as
    `shown` shows them: for a command that stops itself with exit status 2."""
    print(f"error: {shown(text)}", file=sys.stderr)


def shown(text: str) -> str:
    """An error message as the terminal shows it: its own lines kept (an advice line starts with
    two spaces; a file checked against its schema gives one `error:` line per violation), and
    every other control character, in a name it quotes (a file named with a line feed, a colour
    escape, a bidi mark), shown as its escape, so the error keeps its lines and no name drives the
    terminal (tl.engine.class_names.one_line)."""
    parts = re.split(r"(\n(?=  |error: ))", text)  # the message's own line breaks, kept at the odd places
    return "".join(part if i % 2 else one_line(part) for i, part in enumerate(parts))


def _option_holding(path, argv: list[str] | None = None) -> str | None:
    """The option of the command line (`--runs-dir DIR`, `--csv=FILE`, ...) whose path holds
    `path`, the deepest one: the place to change when writing `path` failed. None if none does."""
    if not path:
        return None
    args, target, best = sys.argv[1:] if argv is None else argv, os.path.abspath(os.fsdecode(path)), None
    for i, arg in enumerate(args):
        option, given, value = arg.partition("=")
        if not option.startswith("--") or not (given or i + 1 < len(args)):
            continue
        where = os.path.abspath(value if given else args[i + 1])
        if (target == where or target.startswith(where.rstrip(os.sep) + os.sep)) and \
                (best is None or len(where) > len(best[1])):
            best = (option, where)
    return best[0] if best else None


def _in_cache(path) -> bool:
    """Whether `path` lies in the project's cache folder ($TL_CACHE_DIR, default ~/.cache/tl-reference)."""
    cache = os.environ.get("TL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tl-reference")
    return bool(path) and os.path.abspath(os.fsdecode(path)).startswith(os.path.abspath(cache) + os.sep)
