"""THE train/validate loop. Every recipe, test and benchmark trains through `train_model`.

It is the loop of document 002 §1.3 ("8. 학습/검증"), written out in full:

    for epoch in range(num_epochs):
        for phase in ["train", "val"]:
            net.train() or net.eval()
            if epoch == 0 and phase == "train": continue     # the baseline epoch
            for inputs, labels in dataloaders[phase]:
                with torch.set_grad_enabled(phase == "train"):
                    forward, loss, torch.max -> predictions
                    if phase == "train": backward, step
                accumulate loss * batch size, correct predictions

Three ideas to take away:

* **Epoch 0 does not train.** It only validates, so the first row of every history is
  the network *before* any update: the pretrained features with an untrained random
  head (about chance), or a random network. Every later row is measured against it.
  So `num_epochs` counts that baseline: 002's `num_epochs=2` is one validation-only
  epoch plus one training epoch.
* **`set_grad_enabled(phase == "train")`** records the graph for backward only when we
  will call backward; validation then needs no activation memory for gradients.
* **`net.train()` vs `net.eval()`** switches Dropout and BatchNorm. In train mode a
  BatchNorm layer normalises with the batch's own statistics *and updates its running
  mean/var*, even if its weights are frozen (`requires_grad=False` stops gradients, not
  buffer updates). `frozen_bn_eval=True` keeps such frozen BatchNorm layers in eval
  mode, so a "frozen" backbone really stays frozen (see docs/ERRATA.md on 001/003).
  `bn_eval=True` keeps *every* BatchNorm layer in eval mode, trainable or not: its scale
  and shift still learn, its running statistics stay as ImageNet left them
  (experiments/bn_policy.py measures what each choice does).

Everything optional (scheduler, checkpoints, early stopping, mixed precision) comes in
through arguments; there is no second loop anywhere in the project. A learning-rate
schedule steps once per training epoch (StepLR, as in the PyTorch tutorial) or, with
`scheduler_interval="step"`, after every optimizer step (one-cycle, warmup + cosine). A
recipe in several stages (tl/stages.py) calls this function once per stage with the same
History: epochs `start_epoch .. num_epochs-1` are one stage's share of the run.

**Several processes** (`torchrun`, tl/distributed.py) change three things, each a line
marked `[DDP]`, each a no-op in a single process: the train sampler reshuffles per epoch
(`set_epoch`); after a phase, the loss, correct and image counts are added up over the
processes, so every row is over the whole data set, each val image counted once; the best
epoch's weights are copied from inside the DistributedDataParallel wrapper that `net` arrives
in (DDP averages the gradients inside `backward()`, so every process takes the same step).
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm  # tqdm.std, not tqdm.auto: see the progress bar in train_model

from tl import TLError, distributed
from tl.models import BATCHNORM, frozen_batchnorm_modules


def seed_everything(seed: int) -> None:
    """The one seeding helper: Python, NumPy and torch (CPU and CUDA) RNGs.

    With the same seed, the same data and the same number of threads, a CPU run
    repeats its history exactly (tests/test_loop.py checks it).
    """
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" picks the GPU when there is one; an unavailable device is a clear error.

    Only devices that compute and that this machine has are accepted: torch.device("meta")
    or "mps" on Linux parse fine and fail later, deep inside the first forward pass."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    choices = "use auto, cpu, cuda or cuda:N"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TLError(f"unknown device {name!r}; {choices}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TLError(f"--device {name}: no CUDA GPU is visible to PyTorch on this machine; {choices}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TLError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), "
                          f"numbered from 0; {choices}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise TLError(f"--device {name}: Apple's Metal (MPS) backend is not available here; {choices}")
    elif device.type != "cpu":
        raise TLError(f"--device {name}: {device.type!r} is not a device this project trains on; {choices}")
    return device


@dataclass
class History:
    """What a run measured: one row per (epoch, phase), and the best validation epoch.

    rows: {"epoch", "phase", "loss", "acc", "seconds", "images_per_s"}; epoch 0 has a
    "val" row only (the baseline). The best epoch is the one with the highest val
    accuracy (ties go to the lower val loss), or the lowest val loss when the loop is told
    to monitor the loss; `best_state` holds its weights on the CPU.
    """

    rows: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    best_acc: float = -1.0
    best_loss: float = math.inf
    best_state: dict | None = None
    stopped_early: int | None = None  # the epoch after which a callback stopped training

    def val(self) -> list[dict]:
        return [r for r in self.rows if r["phase"] == "val"]

    def to_dict(self) -> dict:
        """Everything but the weights, for checkpoints and JSON."""
        return {"rows": self.rows, "best_epoch": self.best_epoch, "best_acc": self.best_acc,
                "best_loss": self.best_loss, "stopped_early": self.stopped_early}

    @classmethod
    def from_dict(cls, d: dict, best_state: dict | None = None) -> History:
        return cls(rows=[dict(r) for r in d["rows"]], best_epoch=d["best_epoch"], best_acc=d["best_acc"],
                   best_loss=d["best_loss"], best_state=best_state, stopped_early=d.get("stopped_early"))


def predictions(outputs: torch.Tensor) -> torch.Tensor:
    """Class indices from logits: `torch.max(outputs, 1)` for (B, C) outputs; for a single
    logit per image (B, 1), as in 004 §3's `Linear(1000, 1)`, class 1 where the logit > 0
    (that is, sigmoid > 0.5)."""
    if outputs.shape[1] == 1:
        return (outputs[:, 0] > 0).long()
    _, preds = torch.max(outputs, 1)  # (B,) index of the largest logit
    return preds


def loss_targets(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CrossEntropyLoss takes class indices (B,); BCEWithLogitsLoss on one logit takes
    float targets shaped like the output (B, 1)."""
    return labels.float().unsqueeze(1) if outputs.shape[1] == 1 else labels


def _amp_settings(device: torch.device, amp: bool) -> tuple[bool, torch.dtype]:
    if not amp or device.type != "cuda":
        return False, torch.float32
    # bf16 has float32's exponent range, so no loss scaling is needed; fp16 needs a GradScaler.
    return True, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def make_grad_scaler(device: torch.device | str, amp: bool) -> torch.amp.GradScaler:
    """The loss scaler fp16 autocast needs (disabled, a no-op, everywhere else). Its scale
    adapts during training, so a checkpoint saves it and a resumed run restores it."""
    use_amp, amp_dtype = _amp_settings(torch.device(device), amp)
    return torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)


def train_model(
    net: nn.Module,
    dataloaders: dict[str, torch.utils.data.DataLoader],
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    num_epochs: int,
    *,
    device: torch.device | str = "cpu",
    scheduler=None,
    scheduler_interval: str = "epoch",
    scaler: torch.amp.GradScaler | None = None,
    frozen_bn_eval: bool = False,
    bn_eval: bool = False,
    start_epoch: int = 0,
    history: History | None = None,
    on_epoch_end: Callable[[int, History], bool | None] | None = None,
    amp: bool = False,
    channels_last: bool = False,
    best_by: str = "acc",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> History:
    """Train `net` for epochs `start_epoch .. num_epochs-1`, validating after each.

    `num_epochs` follows 002: it includes the validation-only epoch 0. `on_epoch_end(epoch,
    history)` runs after every epoch (checkpoints, early stopping); returning True stops
    training. Resuming passes the restored `history` and `start_epoch = last epoch + 1`.
    `best_by` picks the best epoch by val "acc" (ties: lower loss) or val "loss" (ties: higher acc).
    """
    if best_by not in ("acc", "loss"):
        raise ValueError(f"best_by must be 'acc' or 'loss', not {best_by!r}")
    if scheduler_interval not in ("epoch", "step"):
        raise ValueError(f"scheduler_interval must be 'epoch' or 'step', not {scheduler_interval!r}")
    device = torch.device(device)
    history = history if history is not None else History()
    net.to(device)
    if channels_last:
        # NHWC: the layout GPU tensor cores prefer, and oneDNN's CPU convolutions too (the
        # depthwise convolutions of EfficientNet/MobileNet most of all: results/benchmark.md)
        net.to(memory_format=torch.channels_last)
    # the BatchNorm layers that stay in eval mode while the rest trains: all of them, the frozen ones, or none
    eval_bn = ([m for m in net.modules() if isinstance(m, BATCHNORM)] if bn_eval
               else frozen_batchnorm_modules(net) if frozen_bn_eval else [])
    use_amp, amp_dtype = _amp_settings(device, amp)
    scaler = scaler if scaler is not None else make_grad_scaler(device, amp)

    for epoch in range(start_epoch, num_epochs):
        for phase in ("train", "val"):
            if epoch == 0 and phase == "train":
                continue  # the baseline: measure the untrained network before any update
            if phase == "train":
                net.train()  # Dropout on, BatchNorm uses and updates batch statistics
                for bn in eval_bn:
                    bn.eval()  # ...except these: normalise with, and keep, their ImageNet running statistics
            else:
                net.eval()

            running_loss, running_correct, seen = 0.0, 0, 0
            distributed.set_epoch(dataloaders[phase], epoch)  # [DDP] this epoch's shuffle, the same on all ranks
            started = time.perf_counter()
            # (tqdm.auto's bar would call iter() on the DataLoader when created, and the `for`
            # again: each phase would start its workers twice and, with workers, draw once more
            # from the shuffle generator, so the batch order would depend on --workers)
            batches = tqdm(dataloaders[phase], desc=f"epoch {epoch}/{num_epochs - 1} {phase}",
                           leave=False, disable=not progress, dynamic_ncols=True)
            for inputs, labels in batches:
                # non_blocking: with pinned memory the copy to the GPU overlaps with compute
                inputs = inputs.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                if channels_last and inputs.dim() == 4:
                    inputs = inputs.contiguous(memory_format=torch.channels_last)
                optimizer.zero_grad(set_to_none=True)  # gradients accumulate unless cleared

                with torch.set_grad_enabled(phase == "train"):
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                        outputs = net(inputs)  # (B, num_classes) logits
                        loss = criterion(outputs, loss_targets(outputs, labels))  # mean over the batch
                    preds = predictions(outputs)  # (B,)
                    if not torch.isfinite(loss):
                        raise NonFiniteLoss(epoch, phase, loss.item())
                    if phase == "train":
                        scaler.scale(loss).backward()  # d(loss)/d(param) for every trainable param
                        scaler.step(optimizer)  # param -= lr * (its update rule)
                        scaler.update()
                        if scheduler is not None and scheduler_interval == "step":
                            scheduler.step()  # a per-step schedule: the next batch gets the next rate

                # loss is a batch mean: weight it by the batch size so the epoch figure is
                # the mean over images even when the last batch is smaller.
                running_loss += loss.item() * inputs.size(0)
                running_correct += (preds == labels).sum().item()
                seen += inputs.size(0)

            # [DDP] sums over all processes: every figure is over the whole data set (no-op in one process)
            running_loss, running_correct, n = distributed.sum_over_processes(running_loss, running_correct, seen)
            seconds = time.perf_counter() - started
            row = {"epoch": epoch, "phase": phase, "loss": running_loss / n, "acc": running_correct / n,
                   "seconds": seconds, "images_per_s": n / seconds if seconds > 0 else float("nan")}
            history.rows.append(row)
            tag = "  (baseline: no training yet)" if epoch == 0 else ""
            log(f"epoch {epoch:>2}/{num_epochs - 1} {phase:<5} loss {row['loss']:.4f}  acc {row['acc']:.4f}"
                f"  [{seconds:5.1f} s, {row['images_per_s']:6.1f} img/s]{tag}")

        if scheduler is not None and scheduler_interval == "epoch" and epoch > 0:
            scheduler.step()  # an epoch schedule (StepLR): after each training epoch, as the tutorial does
        val = history.rows[-1]
        if best_by == "acc":
            better = (val["acc"], -val["loss"]) > (history.best_acc, -history.best_loss)
        else:
            better = (-val["loss"], val["acc"]) > (-history.best_loss, history.best_acc)
        if better:
            history.best_epoch, history.best_acc, history.best_loss = epoch, val["acc"], val["loss"]
            # a copy on the CPU: the live tensors keep changing as training goes on
            history.best_state = {k: v.detach().to("cpu", copy=True)  # [DDP] unwrap: no "module." prefix
                                  for k, v in distributed.unwrap(net).state_dict().items()}
        if on_epoch_end is not None and on_epoch_end(epoch, history):
            history.stopped_early = epoch
            log(f"stopping after epoch {epoch} (requested by the epoch-end callback)")
            break
    return history


class NonFiniteLoss(TLError):
    """The loss became NaN or infinite: the step is not taken and the run stops, so the
    last checkpoint on disk is the last good state."""

    def __init__(self, epoch: int, phase: str, value: float):
        super().__init__(f"the {phase} loss became {value} in epoch {epoch}: training stopped before "
                         f"the update, the last saved checkpoint is the last good state. Try a smaller "
                         f"learning rate (--lr-scale 0.1) or check the data for broken images.")
