"""Progress bars on stderr for every pass of the machinery that can take more than a few seconds.

`progress(iterable, desc)` is the one wrapper: the feature pass (tl/engine/feature_store.py),
the image cache's decoding (tl/engine/image_cache.py), the check of a data folder's files
(tl/engine/images.py), scoring a split (--evaluate, the headline: tl/engine/evaluate.py) and
the scan and classification of --predict DIR (tl/engine/predict.py) each iterate through it,
so none of them is silent for minutes on a large data set. (The training loop, tl/loop.py,
shows its own bar per phase: the core never imports the machinery.) A bar is tqdm's, on
stderr, and is cleared when its pass ends; stdout keeps the run's own lines. It appears only
once its pass has run for `DELAY` seconds: a pass that ends sooner prints nothing, so a small
data set's output (and an error line after a quick scan) stays as it is.

Whether bars show is one switch for the process, on unless turned off:

* `show_progress(False)`: main.py turns it off once for `--no-progress`;
* `progress_shown(on)`: a training run (tl/engine/run.py) holds it at its `RunOptions.progress`
  while it runs, so a library caller's `RunOptions(progress=False)` silences the run's bars too;
* `progress(..., enabled=False)`: one call's own option (predict_folder's `progress`).

Each of them can only turn bars off: a bar shows when the switch and the call both say so.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator

from tqdm import tqdm  # tqdm.std: tqdm.auto's bar would call iter() on a DataLoader twice (tl/loop.py)

from tl.engine.class_names import one_line

_shown = True  # the process's switch (see the module docstring)
DELAY = 2.0  # seconds a pass runs before its bar appears


def show_progress(on: bool) -> None:
    """Turn the machinery's progress bars on or off for the rest of the process (main.py: --no-progress)."""
    global _shown
    _shown = on


def progress_enabled() -> bool:
    return _shown


@contextlib.contextmanager
def progress_shown(on: bool) -> Iterator[None]:
    """Within the block, bars show only if `on` (and they showed before); the switch is restored after."""
    global _shown
    before = _shown
    _shown = before and on
    try:
        yield
    finally:
        _shown = before


def progress(iterable: Iterable, desc: str, total: int | None = None, unit: str = "it", enabled: bool = True):
    """`iterable`, showing a bar on stderr as it is consumed: "desc: 40%|...| 100/250 [00:30<00:45]",
    or, without a length (`total` None and no `len()`), a count of the items seen so far; from
    `DELAY` seconds on. A name in `desc` (a data folder's) shows its control characters as escapes."""
    return tqdm(iterable, desc=one_line(desc), total=total, unit=unit, disable=not (enabled and _shown), leave=False,
                delay=DELAY, dynamic_ncols=True, file=sys.stderr)
