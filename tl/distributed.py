"""[DDP] The lines of the loop that several processes change. Each is a no-op in one process.

Under `torchrun` every process trains the same model on its own share of each epoch's
images, and DistributedDataParallel averages the gradients inside `backward()`, so every
process takes the same step (the process group, the shard samplers and the wrapping are
machinery: tl/engine/distributed.py). The loop itself changes in three places:

* `set_epoch`: the shard sampler draws a new permutation each epoch, from seed + epoch;
* `sum_over_processes`: a process's loss and correct counts cover its shard only, so they
  are added up over all processes before a row is written: every figure is over all images;
* `unwrap`: the best epoch's weights are copied from inside the DDP wrapper (no "module.").
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def set_epoch(loader, epoch: int) -> None:
    """A new shuffle each epoch for a shard sampler (its permutation comes from seed + epoch, so a
    resumed run needs no saved sampler state); other samplers have no `set_epoch`."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)


def sum_over_processes(*values: float) -> tuple[float, ...]:
    """Each value added up over all processes (float64: counts stay exact integers)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)  # gloo and NCCL both: every process gets the same sums
    return tuple(t.tolist())


def unwrap(net: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (its state_dict has no "module." prefix)."""
    return net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net
