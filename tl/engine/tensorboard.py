"""TensorBoard logging of a run (`--tensorboard`): event files in RUN/tensorboard/.

    tensorboard --logdir runs/       # then open http://localhost:6006

Everything is plotted against one x axis, the optimizer step (the number of updates so far),
so a run in several stages (tl/stages.py) reads left to right without a jump:

    loss/train, acc/train, loss/val, acc/val   one point per epoch and phase (`Hooks.end_of_phase`),
                                               at the step where that epoch's training ended;
                                               epoch 0's baseline at step 0
    lr/<group>                                 one point per update (`Hooks.after_step`): the rate
                                               that update was taken with, for each parameter
                                               group ("head", "body", ... or "all")

The lr curves are where a schedule becomes visible: one-cycle's climb and cosine fall,
warmup's ramp then the cosine to zero, StepLR's stairs, a fresh schedule at each stage.

**Resume.** A resumed run (`--resume RUN/last.ckpt`) writes into the same folder, going on
at the step the checkpoint's epoch ended: the restored history's training epochs times the
steps of one epoch (one update per batch of the train loader, which every stage reads with the
same batch size). The interrupted run may have logged steps after its last checkpoint; the
writer opens with `purge_step` at the first step the resumed run will take, and TensorBoard
drops everything the folder holds from that step on. So the curves of an interrupted and
resumed run have exactly the steps of an uninterrupted one (tests/test_tensorboard.py).

Under torchrun only process 0 writes (`tl.engine.distributed.is_main`): the rows it logs are already
summed over all processes, and every process takes the same steps at the same rates.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from tl.engine import distributed
from tl.loop import History


class TensorBoardLog:
    """The run's SummaryWriter and its step count; `writer` None: nothing is logged (no
    --tensorboard, or not process 0), and both hooks are None."""

    def __init__(self, writer, step: int = 0):
        self.writer, self.step = writer, step  # step: updates taken so far in the whole run
        self.optimizer: torch.optim.Optimizer | None = None
        self.rates: list[float] = []  # each group's rate for the next update

    def follow(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer whose rates the next steps log (a new one each stage). Its rates now,
        after its schedule is set up (or restored), are those of the next update."""
        self.optimizer, self.rates = optimizer, [g["lr"] for g in optimizer.param_groups]

    @property
    def after_step(self):
        return self.log_step if self.writer is not None else None

    @property
    def end_of_phase(self):
        return self.log_phase if self.writer is not None else None

    def log_step(self, epoch: int) -> None:
        """After each update: the rate it was taken with, per group; then the schedule's next ones."""
        self.step += 1
        for i, (group, rate) in enumerate(zip(self.optimizer.param_groups, self.rates)):
            self.writer.add_scalar(f"lr/{group.get('name', str(i))}", rate, self.step)
        self.rates = [g["lr"] for g in self.optimizer.param_groups]

    def log_phase(self, epoch: int, phase: str, row: dict) -> None:
        """After each phase: its loss and accuracy. After val, the epoch's last phase, everything is
        flushed to disk before the epoch's checkpoint is written: a resume never misses a step."""
        self.writer.add_scalar(f"loss/{phase}", row["loss"], self.step)
        self.writer.add_scalar(f"acc/{phase}", row["acc"], self.step)
        if phase == "val":
            self.writer.flush()


def steps_done(history: History | None, steps_per_epoch: int) -> int:
    """Updates a (restored) history has taken: one per batch in each of its training epochs."""
    return 0 if history is None else steps_per_epoch * sum(r["phase"] == "train" for r in history.rows)


@contextlib.contextmanager
def opened(enabled: bool, run_dir: Path, history: History | None, steps_per_epoch: int):
    """The run's TensorBoardLog, closed (and flushed) when training ends, however it ends."""
    if not (enabled and distributed.is_main()):  # [DDP] process 0 writes
        yield TensorBoardLog(None)
        return
    from torch.utils.tensorboard import SummaryWriter  # only here: a run without --tensorboard never imports it

    step = steps_done(history, steps_per_epoch)
    # purge_step: whatever an interrupted run logged from the next update on is dropped by TensorBoard
    writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=None if history is None else step + 1)
    try:
        yield TensorBoardLog(writer, step)
    finally:
        writer.close()
