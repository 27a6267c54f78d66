"""Early stopping (004 §2.3, `--patience N`): stop training once val's `monitor` has gone
N epochs without a new best.

The run folder asks after it has saved each epoch (tl/engine/run_folder.py,
`RunFolder.end_of_epoch`), and the loop (tl/loop.py) stops when that callback says so,
recording the epoch in `History.stopped_early`. The best epoch's weights are already in
best.pth, so stopping loses nothing.
"""

from __future__ import annotations


def should_stop(patience: int | None, epoch: int, best_epoch: int) -> bool:
    """True once `patience` epochs have passed since the best val epoch; never without --patience."""
    return patience is not None and epoch - best_epoch >= patience
