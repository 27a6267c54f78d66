"""How much of the core a command makes a learner read: the lines of core (tl/*.py)
functions it enters, counted as tests/test_structure.py counts them.

    python -m benchmarks.trace_core -e resnet_frozen -b efficientnet_lite0 \\
        --data ../shared/data/hymenoptera_data --quick
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def core_lengths() -> dict[tuple[str, int], int]:
    """(file, first line) -> length of every function in tl/*.py."""
    lengths = {}
    for f in (ROOT / "tl").glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths[(str(f), node.lineno)] = node.end_lineno - node.lineno + 1
    return lengths


def main(argv: list[str]) -> int:
    import main as cli

    lengths, entered = core_lengths(), set()

    def profile(frame, event, arg):
        if event == "call":
            code = frame.f_code
            for shift in (0, 1, 2):  # a decorated function's code starts at its decorator
                if (code.co_filename, code.co_firstlineno + shift) in lengths:
                    entered.add((code.co_filename, code.co_firstlineno + shift))
                    break

    sys.setprofile(profile)
    try:
        status = cli.main(argv)
    finally:
        sys.setprofile(None)
    files = {f for f, _ in entered}
    print(f"exit {status}; core lines entered: {sum(lengths[k] for k in entered)} in {len(files)} modules")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
