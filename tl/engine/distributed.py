"""Several processes, one model: DistributedDataParallel (DDP) under `torchrun` (the machinery;
the three lines of the loop it changes are tl/distributed.py).

    torchrun --standalone --nproc_per_node=2 main.py -e resnet_finetune ...        # one machine
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=4 \\
             --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 main.py -e ...        # each of 2 machines

`torchrun` starts one process per device and tells each who it is through environment
variables: RANK (0 .. WORLD_SIZE-1 over all machines), WORLD_SIZE and LOCAL_RANK (the
device index on this machine). `init_from_env` joins them into one *process group*:
NCCL between GPUs, gloo between CPU processes. Without WORLD_SIZE > 1 nothing here does
anything, and every helper answers as a single process would.

What data parallelism is (the torchvision references' `train.py` does the same):

* every process holds the same model and sees its own 1/N of each epoch's images
  (`sampler`): the batch size is per process, so one step uses N x batch images;
* DDP averages the gradients over the processes inside `backward()`, so every process
  takes the same step and the weights stay identical without ever being sent again;
* what a process measures (loss, correct predictions) covers its shard only: the loop
  adds them up over all processes (`sum_over_processes`) before it prints or stores
  anything, so every figure is over the whole data set.

Two details make that exact rather than nearly so:

* **val counts every image once.** torch's `DistributedSampler` pads the shards to equal
  length by repeating images, which would count some val images twice. `sampler` gives val
  a `ShardSampler` (image i goes to process i mod N, no padding); training keeps the padded
  `DistributedSampler`, whose equal shard lengths keep the processes' steps in lock step
  (its train rows so include the up to N-1 repeated images: they were trained on).
* **BatchNorm statistics.** Each process updates its BatchNorm running statistics from
  its own batches, so they drift apart while the weights do not. DDP (`broadcast_buffers`,
  on by default) copies process 0's buffers to all at the start of the forward pass that
  follows a training step: the first val batch, so val and the saved state use process 0's
  statistics everywhere (tests/test_distributed.py checks the processes end identical).
  With `--sync-bn` on GPUs, SyncBatchNorm normalises with the whole N x batch instead.

Random numbers: every process seeds with the same `--seed` and draws the same number of
random numbers (equal train shards, deterministic val), so all processes' RNG states are
equal at every epoch end, and the one state the checkpoint saves restores them all. The
price: process r's k-th image gets the same random crop as process 0's k-th image (other
images, the same crop parameters).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections import Counter
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler, Sampler

from tl.distributed import set_epoch, sum_over_processes, unwrap  # noqa: F401 - the core's [DDP] lines


def init_from_env() -> bool:
    """Join the process group `torchrun` described in the environment; False (and nothing
    done) in a plain single-process start."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per process
    dist.init_process_group(backend="nccl" if cuda else "gloo")  # rank, size, address: from the env
    return True


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Process 0: the only one that writes files (run folder, checkpoints, plots, caches)."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Process 0 runs the block first; the others wait, then run it and find its results on
    disk (the feature cache: computed once, then loaded by everyone)."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def from_main(obj):
    """Process 0's value of `obj` on every process (e.g. the run folder's name)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def describe(device: torch.device, batch_size: int) -> str:
    """The line a distributed run starts with: processes, machines, backend, every process's
    device, and the batch per process and per step. Every process must call it (it gathers)."""
    found = [None] * world_size()
    dist.all_gather_object(found, (socket.gethostname(), str(device)))
    devices = Counter(d for _, d in found)
    return (f"distributed: {world_size()} processes on {len({host for host, _ in found})} machine(s), backend "
            f"{dist.get_backend()}, devices {', '.join(d + (f' x{n}' if n > 1 else '') for d, n in devices.items())}; "
            f"batch {batch_size} per process, {batch_size * world_size()} per step")


def local_device(device: torch.device) -> torch.device:
    """This process's own GPU (cuda:LOCAL_RANK) when training on CUDA under torchrun."""
    if is_distributed() and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


class ShardSampler(Sampler[int]):
    """Image i to process i mod N, in order, without padding: together the processes see
    every image exactly once (for val; the shards may differ in length by one)."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int):
        self.indices = range(rank, len(dataset), num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class WeightedShardSampler(Sampler[int]):
    """`--balanced-sampler` in N processes: one weighted draw (with replacement) from seed +
    epoch, the same on every process, dealt out: process r takes draws r, r + N, r + 2N, ...
    Each shard has ceil(len / N) images, so the processes step in lock step."""

    def __init__(self, weights, num_replicas: int, rank: int, seed: int):
        self.weights, self.num_replicas, self.rank = torch.as_tensor(weights, dtype=torch.double), num_replicas, rank
        self.seed, self.epoch = seed, 0
        self.num_samples = -(-len(self.weights) // num_replicas)  # ceil

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        drawn = torch.multinomial(self.weights, self.num_samples * self.num_replicas, replacement=True, generator=g)
        return iter(drawn[self.rank::self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


def sampler(dataset: Dataset, *, shuffle: bool, seed: int, weights=None) -> Sampler | None:
    """This process's share of `dataset`; None in a single process (the DataLoader's own).

    train: `DistributedSampler`, a permutation drawn from seed + epoch (`set_epoch`), the
    same on every process, cut into N equal shards (the last padded with repeated images);
    with `weights` (`--balanced-sampler`), its share of one weighted draw (`WeightedShardSampler`).
    val/test: `ShardSampler`, every image once."""
    if not is_distributed():
        return None
    if shuffle and weights is not None:
        return WeightedShardSampler(weights, world_size(), rank(), seed)
    if shuffle:
        return DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed)
    return ShardSampler(dataset, world_size(), rank())




def wrap(net: nn.Module, device: torch.device, sync_bn: bool = False) -> nn.Module:
    """`net` in DistributedDataParallel (process 0's weights copied to all as it wraps), or
    `net` itself in a single process. `sync_bn` swaps BatchNorm for SyncBatchNorm in place
    (the same parameters, so optimizer and checkpoints are unaffected); it needs GPUs."""
    if not is_distributed():
        return net
    if sync_bn:
        if device.type != "cuda":
            from tl import TLError

            raise TLError("--sync-bn needs GPUs: torch's SyncBatchNorm does not run on the CPU (gloo)")
        try:  # timm's version also converts its BatchNormAct2d (EfficientNet-Lite0) and keeps the activation
            from timm.layers import convert_sync_batchnorm
        except ImportError:
            convert_sync_batchnorm = nn.SyncBatchNorm.convert_sync_batchnorm
        net = convert_sync_batchnorm(net)  # in place below the top module: `net` is not itself a BatchNorm
    if not any(p.requires_grad for p in net.parameters()):
        return net  # nothing trains: nothing to synchronise
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(net, device_ids=ids)


def broadcast_buffers(net: nn.Module) -> None:
    """Process 0's buffers (BatchNorm statistics) copied to every process; nothing in one process."""
    if is_distributed():
        for buffer in net.buffers():
            dist.broadcast(buffer, src=0)
