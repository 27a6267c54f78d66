"""Several callbacks on one hook of the loop (tl/loop.py `Hooks`).

Each of the loop's callback hooks (`after_step`, `end_of_phase`, `end_of_epoch`) holds one
callable. Features that each want a say (TensorBoard logging, a learning-rate finder, an
average of the weights) are combined into that one callable here, so none of them needs to
know the others, and the loop stays as it is.
"""

from __future__ import annotations

from collections.abc import Callable


def combine(*callbacks: Callable | None) -> Callable | None:
    """One callable that calls every given callback (None ones are left out) with the same
    arguments, in order, and returns True if any of them did ("stop"). Every callback is
    called each time, even after one asked to stop: a logger still records the last step.
    No callback at all gives None, the loop's "nothing to call"."""
    present = [c for c in callbacks if c is not None]
    if not present:
        return None
    if len(present) == 1:
        return present[0]

    def all_of(*args) -> bool:
        results = [c(*args) for c in present]  # a list, not any(...): no callback is skipped
        return any(bool(r) for r in results)

    return all_of
