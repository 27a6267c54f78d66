"""Measurements of the loop, the caches and the data path: timings and figures for results/, never
test thresholds. Each module is a command, `python -m benchmarks.NAME --help`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def command(main: Callable[[], int | None]) -> int:
    """Run a benchmark's `main`: bad input (a TLError: a missing data folder, say) or an OSError
    from the user's files (an `--out` that cannot be written) is one `error:` line and exit
    status 2, as for main.py, never a traceback."""
    from tl import TLError

    try:
        return main() or 0
    except (TLError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


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
