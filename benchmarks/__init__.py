"""Measurements of the loop, the caches and the data path: timings and figures for results/, never
test thresholds. Each module is a command, `python -m benchmarks.NAME --help`, run by
`command` (tl/engine/command.py), the wrapper main.py and the studies share: a TLError or an
OSError is one error: line and exit status 2, Ctrl-C exit 130."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from tl.engine.command import command  # noqa: F401  (every benchmark's `sys.exit(command(main))`)


def invocation_of(module: str, argv: list[str] | None) -> str:
    """The command that ran, as a user would type it again: `python -m MODULE ARGS`, each argument
    quoted for the shell where it needs it (a path with a space or a ;). Pages and records show it."""
    return " ".join(["python", "-m", module, *map(shlex.quote, sys.argv[1:] if argv is None else argv)])


def write_files(files: dict[Path, str]) -> None:
    """Write each file atomically (temporary file, then rename), every text built before the first
    write, one process at a time and all of them or none (tl.engine.files.updating): a failed
    write leaves no half-written file and no table beside an older page, two benchmarks at once
    no table of one beside the page of the other, and nothing is written after a failed measurement."""
    from tl.engine.files import atomic_write_text, updating

    folder = Path(os.path.commonpath([Path(p).parent for p in files]))
    with updating(folder, "a benchmark writing " + ", ".join(Path(p).name for p in files)):
        for path, text in files.items():
            atomic_write_text(path, text)


@contextlib.contextmanager
def child_process(argv: list[str], **popen: object) -> Iterator[subprocess.Popen]:
    """A measurement's own process (`subprocess.Popen(argv, **popen)`), in a process group of its
    own: whatever ends the block (its end, Ctrl-C, SIGTERM, a timeout, an error), the child and
    its DataLoader workers end with it, and a signal to the benchmark's group reaches the
    benchmark alone, so only the benchmark says why it stopped."""
    child = subprocess.Popen(argv, start_new_session=True, **popen)
    try:
        yield child
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def spread(values: list[float]) -> dict:
    """The median of repeated measurements, their min and max, and how many there were."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= minimum, with a one-line message otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
        return value

    return parse
