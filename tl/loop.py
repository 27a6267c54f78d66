"""THE train/validate loop. Every recipe and study of the project trains through `train_model`.

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
  buffer updates). `Hooks.frozen_bn_eval` keeps such frozen BatchNorm layers in eval
  mode, so a "frozen" backbone really stays frozen (see docs/ERRATA.md on 001/003).
  `Hooks.bn_eval` keeps *every* BatchNorm layer in eval mode, trainable or not: its scale
  and shift still learn, its running statistics stay as ImageNet left them
  (experiments/bn_policy.py measures what each choice does).

Everything optional (a schedule, checkpoints, early stopping, mixed precision) comes in
through one `Hooks` object whose defaults are the tutorial's loop; the project trains in no
other loop (tests/test_loop.py holds 002's own as an oracle, benchmarks/peers.py runs fastai's).
A learning-rate schedule steps once per training epoch (StepLR, as in the PyTorch tutorial) or,
with `scheduler_interval="step"`, after every optimizer step (one-cycle, warmup + cosine); a
staged recipe (tl/stages.py) calls this function once per stage with the same History.

**Several processes** (`torchrun`; tl/distributed.py) change three things, each a line
marked `[DDP]`, each a no-op in a single process: the train sampler reshuffles per epoch
(`set_epoch`); after a phase, the loss, correct and image counts are added up over the
processes, so every row is over the whole data set, each val image counted once; the best
epoch's weights are copied from inside the DistributedDataParallel wrapper that `net` arrives
in (DDP averages the gradients inside `backward()`, so every process takes the same step).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm  # tqdm.std, not tqdm.auto: see progress_bar

from tl import TLError, distributed
from tl.models import eval_batchnorm


def seed_everything(seed: int) -> None:
    """The one seeding helper: Python's, NumPy's and torch's (CPU and CUDA) RNGs. With the same
    seed, data and number of threads a CPU run repeats its history exactly (tests/test_loop.py).
    Python's string hashing is seeded at interpreter start (PYTHONHASHSEED): no run needs it."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


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
        return cls(rows=[dict(r) for r in d["rows"]], best_epoch=d["best_epoch"],
                   best_acc=d["best_acc"], best_loss=d["best_loss"], best_state=best_state,
                   stopped_early=d.get("stopped_early"))


def predictions(outputs: torch.Tensor) -> torch.Tensor:
    """Class indices from logits: `torch.max(outputs, 1)` for (B, C) outputs; for one logit
    per image (B, 1), 004 §3's `Linear(1000, 1)`, class 1 where the logit > 0 (sigmoid > 0.5)."""
    if outputs.shape[1] == 1:
        return (outputs[:, 0] > 0).long()
    _, preds = torch.max(outputs, 1)  # (B,) index of the largest logit
    return preds


def loss_targets(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CrossEntropyLoss takes class indices (B,); BCEWithLogitsLoss on one logit takes
    float targets shaped like the output (B, 1)."""
    return labels.float().unsqueeze(1) if outputs.shape[1] == 1 else labels


@dataclass
class Hooks:
    """Everything optional about a training run, in one place. The defaults are the tutorial's
    loop: float32, no schedule, no callbacks, BatchNorm in train mode while training.

    The machinery (tl/engine/) fills these in; a learner can ignore them all. Each hook is a
    point where a later feature plugs in without a second loop.
    """

    scheduler: object = None  # a learning-rate schedule (StepLR in the tutorial)
    scheduler_interval: str = "epoch"  # step it after each training "epoch" or optimizer "step"
    frozen_bn_eval: bool = False  # frozen BatchNorm layers stay in eval mode (docs/ERRATA.md)
    bn_eval: bool = False  # every BatchNorm layer stays in eval mode (experiments/bn_policy.py)
    best_by: str = "acc"  # the best epoch: highest val "acc" (ties: lower loss) or lowest "loss"
    autocast_dtype: torch.dtype | None = None  # mixed precision on a GPU (bf16/fp16); None: float32
    scaler: torch.amp.GradScaler | None = None  # fp16: scales the loss so small gradients survive
    channels_last: bool = False  # NHWC memory layout (faster convolutions on GPUs and oneDNN CPUs)
    device_sums: bool = False  # a GPU: no finite-loss check per batch, the sums checked per phase
    validate_with: nn.Module | None = None  # score val with this model (an averaged copy, say)
    after_step: Callable[[int], bool | None] | None = None  # after each update; True stops
    end_of_phase: Callable[[int, str, dict], None] | None = None  # (epoch, phase, row): logging
    end_of_epoch: Callable[[int, History], bool | None] | None = None  # checkpoints; True stops
    progress: bool = True  # tqdm progress bars
    log: Callable[[str], None] = print

    def __post_init__(self):
        if self.best_by not in ("acc", "loss"):
            raise ValueError(f"best_by must be 'acc' or 'loss', not {self.best_by!r}")
        if (interval := self.scheduler_interval) not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', not {interval!r}")


def train_model(net: nn.Module, dataloaders: dict, criterion: nn.Module,
                optimizer: torch.optim.Optimizer, num_epochs: int,
                device: torch.device | str = "cpu", history: History | None = None,
                hooks: Hooks | None = None) -> History:
    """Train `net` for the epochs `history` has not seen yet, up to `num_epochs - 1`, validating
    after each; `num_epochs` counts 002's validation-only epoch 0. A resumed run, or a staged
    recipe's next stage (tl/stages.py), passes its History so far and the loop goes on after
    its last row. The lines of document 002 §1.3 stand in its order; each option is one call."""
    hooks, device = hooks or Hooks(), torch.device(device)
    history = history if history is not None else History()
    first = history.rows[-1]["epoch"] + 1 if history.rows else 0  # resumed, or a later stage
    move_to_device(net, device, hooks.channels_last)
    eval_bn = eval_batchnorm(net, hooks.frozen_bn_eval, hooks.bn_eval)  # kept in eval mode

    for epoch in range(first, num_epochs):
        stop = False
        for phase in ("train", "val"):
            if phase == "train":
                net.train()  # Dropout on, BatchNorm uses and updates batch statistics
                for bn in eval_bn:
                    bn.eval()  # ...except these: they keep their ImageNet running statistics
            else:
                net.eval()  # Dropout off, BatchNorm uses its running statistics

            if epoch == 0 and phase == "train":
                continue  # the baseline: measure the untrained network before any update

            model = scored_model(net, phase, hooks)  # val may score an averaged copy (--ema)
            distributed.set_epoch(dataloaders[phase], epoch)  # [DDP] this epoch's shuffle
            row, phase_stop = run_phase(model, dataloaders[phase], criterion, optimizer,
                                        (epoch, num_epochs, phase), device, hooks)
            stop = stop or phase_stop  # a stop asked in train outlives the val phase after it
            history.rows.append(row)
            report(row, num_epochs, hooks)  # 002's print, one line per phase (docs/ERRATA.md 8)
        step_epoch_schedule(hooks, epoch)  # StepLR: after each training epoch, as the tutorial does
        remember_if_best(history, model, hooks.best_by)  # the weights val just scored
        if should_stop(epoch, history, stop, hooks):
            break
    return history


def run_phase(net: nn.Module, loader, criterion: nn.Module, optimizer: torch.optim.Optimizer,
              where: tuple, device: torch.device, hooks: Hooks) -> tuple[dict, bool]:
    """One pass over one phase's batches: forward, loss, and in "train" backward and step.
    `where` is (epoch, num_epochs, phase). Returns the phase's row and whether a hook said stop."""
    epoch, num_epochs, phase = where
    epoch_loss, epoch_corrects, seen, stop = 0.0, 0, 0, False
    started = time.perf_counter()

    for inputs, labels in progress_bar(loader, where, hooks.progress):
        inputs, labels = to_device(inputs, labels, device, hooks.channels_last)
        optimizer.zero_grad(set_to_none=True)  # gradients accumulate unless cleared

        with torch.set_grad_enabled(phase == "train"):
            with autocast(device, hooks.autocast_dtype):  # mixed precision, when asked
                outputs = net(inputs)  # (B, num_classes) logits
                loss = criterion(outputs, loss_targets(outputs, labels))  # mean over the batch
            preds = predictions(outputs)  # (B,) 002's torch.max(outputs, 1)
            check_finite(loss, where, hooks.device_sums)  # a NaN/inf loss stops before any update

            if phase == "train":
                if hooks.scaler is None:
                    loss.backward()  # d(loss)/d(param) for every trainable parameter
                    optimizer.step()  # param -= lr * (its update rule)
                else:
                    scaled_step(loss, optimizer, hooks.scaler)  # fp16: the same, on a scaled loss
                stop = after_update(epoch, hooks)  # a per-step schedule, EMA, an LR finder's stop

            # 002's `loss.item() * inputs.size(0)` and `torch.sum(preds == labels)`, kept as tensors
            # (the loss in float64), read once per phase: with device sums a GPU never waits
            epoch_loss += loss.detach().double() * inputs.size(0)  # a batch mean times its size
            epoch_corrects += torch.sum(preds == labels)
        seen += inputs.size(0)
        if stop:
            break
    return phase_row(epoch_loss, epoch_corrects, seen, where, started), stop


# ------------------------------------------------------------------------- the loop's named calls
def move_to_device(net: nn.Module, device: torch.device, channels_last: bool) -> None:
    """The model's weights on the device, in NHWC layout when asked (faster GPU convolutions)."""
    net.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)


def to_device(inputs: torch.Tensor, labels: torch.Tensor, device: torch.device,
              channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch on the device; non_blocking: with pinned memory the copy overlaps with compute."""
    inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    if channels_last and inputs.dim() == 4:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    return inputs, labels


def progress_bar(loader, where: tuple, enabled: bool):
    """tqdm over the batches (tqdm.std: tqdm.auto's bar would call iter() on the DataLoader when
    created, and the `for` again, so each phase would start its workers twice and draw once more
    from the shuffle generator)."""
    epoch, num_epochs, phase = where
    return tqdm(loader, desc=f"epoch {epoch}/{num_epochs - 1} {phase}", leave=False,
                disable=not enabled, dynamic_ncols=True)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast on the device when a dtype is given; otherwise a context that does nothing."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def scored_model(net: nn.Module, phase: str, hooks: Hooks) -> nn.Module:
    """The model a phase runs: `net`, or in val `hooks.validate_with` (in eval mode), if given."""
    if phase == "val" and hooks.validate_with is not None:
        return hooks.validate_with.eval()
    return net


def check_finite(loss: torch.Tensor, where: tuple, device_sums: bool) -> None:
    """NonFiniteLoss when the loss is NaN or infinite, before backward() and the step. With
    device sums (a GPU) the check waits for the phase's end (phase_row), to spare a sync a batch."""
    if not device_sums and not torch.isfinite(loss):
        epoch, _, phase = where
        raise NonFiniteLoss(epoch, phase, loss.item())


def scaled_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler) -> None:
    """fp16's backward and step: the loss scaled up so small gradients survive, unscaled
    before the update."""
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def after_update(epoch: int, hooks: Hooks) -> bool:
    """After each update: a per-step schedule's next rate, then `after_step` (True: stop)."""
    if hooks.scheduler is not None and hooks.scheduler_interval == "step":
        hooks.scheduler.step()  # one-cycle, warmup + cosine: the next batch gets the next rate
    return hooks.after_step is not None and bool(hooks.after_step(epoch))


def phase_row(epoch_loss, epoch_corrects, seen: int, where: tuple, started: float) -> dict:
    """The phase's row: mean loss and accuracy over its images (ERRATA 8: every phase)."""
    epoch, _, phase = where
    epoch_loss, epoch_corrects = float(epoch_loss), int(epoch_corrects)  # the one read of the sums
    if not math.isfinite(epoch_loss):  # device sums: a NaN/inf loss is seen here, at the phase end
        raise NonFiniteLoss(epoch, phase, epoch_loss, at_phase_end=True)
    # [DDP] sums over all processes: every figure is over the whole data set (no-op in one process)
    epoch_loss, epoch_corrects, n = distributed.sum_over_processes(epoch_loss, epoch_corrects, seen)
    seconds = time.perf_counter() - started
    return {"epoch": epoch, "phase": phase, "loss": epoch_loss / n, "acc": epoch_corrects / n,
            "seconds": seconds, "images_per_s": n / seconds if seconds > 0 else float("nan")}


def report(row: dict, num_epochs: int, hooks: Hooks) -> None:
    """The phase's line (the baseline epoch marked), then the `end_of_phase` hook."""
    tag = "  (baseline: no training yet)" if row["epoch"] == 0 else ""
    speed = f"[{row['seconds']:5.1f} s, {row['images_per_s']:6.1f} img/s]"
    hooks.log(f"epoch {row['epoch']:>2}/{num_epochs - 1} {row['phase']:<5} loss {row['loss']:.4f}  "
              f"acc {row['acc']:.4f}  {speed}{tag}")
    if hooks.end_of_phase is not None:
        hooks.end_of_phase(row["epoch"], row["phase"], row)


def step_epoch_schedule(hooks: Hooks, epoch: int) -> None:
    """An epoch schedule (StepLR) steps after each training epoch; epoch 0 did not train."""
    if hooks.scheduler is not None and hooks.scheduler_interval == "epoch" and epoch > 0:
        hooks.scheduler.step()


def should_stop(epoch: int, history: History, stop: bool, hooks: Hooks) -> bool:
    """True when `after_step` asked to stop during this epoch, or `end_of_epoch` (checkpoints,
    early stopping) asks now; the History notes the epoch."""
    if stop or (hooks.end_of_epoch is not None and hooks.end_of_epoch(epoch, history)):
        history.stopped_early = epoch
        who = "after_step" if stop else "the epoch-end callback"
        hooks.log(f"stopping after epoch {epoch} (requested by {who})")
        return True
    return False


def remember_if_best(history: History, net: nn.Module, best_by: str) -> None:
    """If the epoch just validated is the best so far, note it and keep a copy of its weights."""
    val = history.val()[-1]
    if best_by == "acc":
        better = (val["acc"], -val["loss"]) > (history.best_acc, -history.best_loss)
    else:
        better = (-val["loss"], val["acc"]) > (-history.best_loss, history.best_acc)
    if better:
        history.best_epoch = val["epoch"]
        history.best_acc, history.best_loss = val["acc"], val["loss"]
        # a copy on the CPU (the live tensors keep changing); [DDP] unwrap: no "module." prefix
        state = distributed.unwrap(net).state_dict()
        history.best_state = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


class NonFiniteLoss(TLError):
    """The loss became NaN or infinite: the step is not taken and the run stops, so the
    last checkpoint on disk is the last good state."""

    def __init__(self, epoch: int, phase: str, value: float, at_phase_end: bool = False):
        when = ("training stopped at the end of the phase (on a GPU the loss is read once per "
                "phase), before any checkpoint of this epoch" if at_phase_end
                else "training stopped before the update")
        fix = "Try a smaller learning rate (--lr-scale 0.1) or check the data for broken images."
        super().__init__(f"the {phase} loss became {value} in epoch {epoch}: {when}, the last "
                         f"saved checkpoint is the last good state. {fix}")
