"""The learning-rate range test (`main.py -e RECIPE --find-lr`): Smith 2017, as fastai's `lr_find`.

    python main.py -e resnet_frozen -b efficientnet_lite0 --data DIR --find-lr
      -> runs/lr-finder-resnet_frozen-efficientnet_lite0-<time>/lr_finder.png, lr_finder.csv

**The idea.** Train for a few dozen steps while the learning rate grows by the same factor
at every step, from far too small (1e-7) to far too large (10), and watch the loss. At tiny
rates the weights hardly move and the loss stays flat; as the rate grows, each step starts
to help and the loss falls; past some rate the steps overshoot and the loss shoots up. The
curve of loss against rate (on a log axis) shows in one short run where that window lies.

**What it tests.** The recipe's first stage (tl/stages.py), as the run would start it: the
same weights, trainable set, optimizer and loss. Every parameter group's rate is multiplied
by the same factor each step (a `LambdaLR`, stepped per update), so the recipe's ratios
between groups (body : neck : head) are kept and one number sweeps them all; the rate
reported is the reference group's, the head where the recipe has one (the new layer every
recipe trains), else the group with the largest rate. The stage's own schedule is left out:
the sweep is the schedule.

**The one loop.** It runs through `tl.loop.train_model` like every run: the criterion is
wrapped so it remembers its last value (`LastLoss`), and `Hooks.after_step` records that
loss against the rate it was taken with, keeps an exponentially smoothed copy (the raw
per-batch loss is too noisy to read), and returns True to stop when the smoothed loss
exceeds 4 times its best (divergence: fastai's rule) or after the planned steps. A loss
that turns NaN or infinite stops the loop (`NonFiniteLoss`): that is divergence too.

**It only trains.** Only the train split is read (val and test are never opened); the
loop's validation phase, which it runs after each epoch, scores one train batch held back
in memory, and those numbers are thrown away. The trained weights are thrown away too:
nothing here is a run (no config.json, no checkpoint), the folder holds a plot and a CSV.

**The suggestion** is a tenth of the rate where the smoothed loss is lowest ("minimum/10",
fastai's `lr_min`). The minimum is a robust landmark: one point of the smoothed curve, well
defined even on a short, noisy test, whereas the steepest descent (fastai's `lr_steep`) is
the slope of a noisy curve, which moves with every batch. At the minimum the rate is already
at the edge of instability (and the smoothing lags, so the true edge is a little earlier):
an order of magnitude below it the loss was still falling steadily. It is a starting point,
not an answer: the test runs a few dozen steps from the starting weights, while a real run
trains for epochs, with a schedule that changes the rate, and the rate that is best for the
first steps is not always the best for the whole run. Compare it with the recipe's rate
(printed beside it); a recipe more than ten times off is worth a run at the suggested rate.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, TensorDataset

from tl import TLError
from tl.engine import distributed
from tl.engine.device import autocast_dtype
from tl.engine.options import RunOptions
from tl.engine.run import begin, build_model_and_stages, choose_images, combine
from tl.engine.run_folder import make_run_dir
from tl.engine.stage_setup import stage_hooks, start_stage
from tl.engine.tables import write_table
from tl.loop import NonFiniteLoss, train_model
from tl.recipe import BuildFn, Recipe, make_criterion

START_LR, END_LR, STEPS = 1e-7, 10.0, 100  # the reference group's sweep: fastai's lr_find defaults
SMOOTHING = 0.98  # exponential moving average of the loss (fastai's beta)
DIVERGED = 4.0  # stop when the smoothed loss exceeds this many times its best
# where the smoothed loss was lowest, for each answer of `no_window`, in the words a report prints
NO_WINDOW = {"first": "within a decade of the first rate", "last": "at the last rate"}


class LastLoss(nn.Module):
    """The criterion, remembering the value of its last call: the loop hands `after_step`
    only the epoch, and the range test needs every step's loss."""

    def __init__(self, criterion: nn.Module):
        super().__init__()
        self.criterion, self.last = criterion, math.nan

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = self.criterion(outputs, targets)
        self.last = float(loss.detach())  # one read per step: the divergence test needs the number now
        return loss


@dataclass
class RangeTest:
    """The `after_step` callback of the range test, and the curve it records: for each step,
    the reference group's rate it was taken with, its loss and the smoothed loss."""

    optimizer: torch.optim.Optimizer
    criterion: LastLoss
    reference: int  # index of the reported parameter group
    steps: int
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    diverged: bool = False
    average: float = 0.0

    def __post_init__(self):
        self.rate = self.optimizer.param_groups[self.reference]["lr"]  # the next update's rate

    def __call__(self, epoch: int) -> bool:
        """After each update: record it; True (stop) on divergence or after the planned steps."""
        self.lrs.append(self.rate)
        self.rate = self.optimizer.param_groups[self.reference]["lr"]  # the schedule has stepped: the next one
        loss = self.criterion.last
        self.losses.append(loss)
        self.average = SMOOTHING * self.average + (1 - SMOOTHING) * loss
        smoothed = self.average / (1 - SMOOTHING ** len(self.losses))  # bias correction: the average starts at 0
        self.smoothed.append(smoothed)
        if not math.isfinite(smoothed) or smoothed > DIVERGED * min(self.smoothed):
            self.diverged = True
        return self.diverged or len(self.lrs) >= self.steps


def suggestion(lrs: list[float], smoothed: list[float]) -> tuple[float, int]:
    """(suggested rate, index of the lowest smoothed loss): a tenth of the rate where the
    smoothed loss is lowest (see the module docstring for why not the steepest descent)."""
    finite = [(loss, i) for i, loss in enumerate(smoothed) if math.isfinite(loss)]
    if not finite:
        raise TLError("the range test recorded no finite loss: the loss diverged at the first step")
    _, best = min(finite)
    return lrs[best] / 10, best


@dataclass
class LrFinderResult:
    recipe: str
    backbone: str
    stage: str  # the name of the recipe's first stage, the one tested
    group: str  # the reference group
    recipe_lr: float  # the recipe's rate for that group (times --lr-scale)
    suggested_lr: float
    groups: dict[str, float]  # every group's rate in the recipe
    test: RangeTest
    folder: Path | None = None  # where lr_finder.png and lr_finder.csv were written


def reference_group(optimizer: torch.optim.Optimizer) -> int:
    """The group whose rate is swept and reported: "head" if there is one, else the largest rate."""
    names = [g.get("name") for g in optimizer.param_groups]
    if "head" in names:
        return names.index("head")
    return max(range(len(names)), key=lambda i: optimizer.param_groups[i]["lr"])


def find_lr(recipe: Recipe, build: BuildFn, opts: RunOptions, *, start_lr: float = START_LR, end_lr: float = END_LR,
            steps: int = STEPS, log=print) -> LrFinderResult:
    """The range test of `recipe`'s first stage on the train split (see the module docstring)."""
    if distributed.is_distributed():  # each process's loss would decide its own stop: run it in one process
        raise TLError("--find-lr runs in one process: start it with python, not torchrun")
    # images, not stored features: the cache's probe reads val, and an augmented train set is not cached
    opts = dataclasses.replace(opts, feature_cache=False, tensorboard=False)
    ctx = begin(recipe, opts, log)
    choose_images(ctx, phases=("train",))
    build_model_and_stages(ctx, build, resumed=False)
    span = ctx.spans[0]
    span = dataclasses.replace(span, stage=dataclasses.replace(span.stage, schedule=None))  # the sweep replaces it
    setup = start_stage(span, ctx, None)
    optimizer = setup.optimizer
    if not any(p.requires_grad for g in optimizer.param_groups for p in g["params"]):
        raise TLError(f"{ctx.recipe.name}'s first stage ({span.stage.name!r}) trains no parameter: there is no "
                      f"learning rate to test")
    groups = {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
    ref = reference_group(optimizer)
    recipe_lr = optimizer.param_groups[ref]["lr"]
    growth = (end_lr / start_lr) ** (1 / max(1, steps - 1))  # the same factor every step: a geometric sweep
    scheduler = LambdaLR(optimizer, lambda step: start_lr / recipe_lr * growth ** step)  # every group, ratios kept
    criterion = LastLoss(make_criterion(ctx.recipe, ctx.class_weights).to(ctx.device))
    test = RangeTest(optimizer, criterion, ref, steps)
    hooks = dataclasses.replace(stage_hooks(span, ctx.recipe, scheduler), scheduler_interval="step",
                                autocast_dtype=autocast_dtype(ctx.device, opts.amp), channels_last=opts.channels_last,
                                scaler=ctx.scaler if ctx.scaler.is_enabled() else None, progress=opts.progress,
                                log=lambda _: None, after_step=combine(test))
    loaders = {"train": setup.loaders["train"], "val": held_back_batch(setup.loaders["train"])}
    try:
        train_model(setup.net, loaders, criterion, optimizer, 1 + math.ceil(steps / len(loaders["train"])),
                    ctx.device, None, hooks)
    except NonFiniteLoss:
        test.diverged = True  # the loss overflowed: the update was not taken, the curve ends before it
    suggested, _ = suggestion(test.lrs, test.smoothed)
    result = LrFinderResult(ctx.recipe.name, ctx.recipe.backbone, span.stage.name, optimizer.param_groups[ref].get(
        "name", str(ref)), recipe_lr, suggested, groups, test, None)
    result.folder = write_range_test(result, Path(opts.out))
    report(result, log)
    return result


def held_back_batch(train: DataLoader) -> DataLoader:
    """What the loop's val phase scores: one train batch, drawn once and kept in memory. The loop
    validates after every epoch; here val is never read, and these numbers are thrown away."""
    inputs, labels = next(iter(train))
    return DataLoader(TensorDataset(inputs, labels), batch_size=len(labels))


def write_range_test(result: LrFinderResult, out: Path) -> Path:
    """OUT/lr-finder-<recipe>-<backbone>-<time>/ with lr_finder.csv and lr_finder.png."""
    folder = make_run_dir(out, f"lr-finder-{result.recipe}-{result.backbone}-{time.strftime('%Y%m%d-%H%M%S')}",
                                  explicit=False)
    t = result.test
    write_table(folder / "lr_finder.csv", [{"lr": lr, "loss": loss, "smoothed": s}
                                           for lr, loss, s in zip(t.lrs, t.losses, t.smoothed)])
    range_test_plot(result, folder / "lr_finder.png")
    return folder


def range_test_plot(result: LrFinderResult, path: Path) -> Path:
    """Loss against the reference group's rate on a log axis: raw and smoothed, the minimum, the
    suggestion and the recipe's own rate."""
    from tl.engine.plots import plt, save_figure

    t = result.test
    _, best = suggestion(t.lrs, t.smoothed)
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    ax.plot(t.lrs, t.losses, color="tab:blue", alpha=0.3, label="loss per step")
    ax.plot(t.lrs, t.smoothed, color="tab:blue", label="smoothed loss")
    ax.scatter([t.lrs[best]], [t.smoothed[best]], color="black", zorder=5, label="lowest smoothed loss")
    ax.axvline(result.suggested_lr, color="tab:green", label=f"suggested: {result.suggested_lr:.1e} (minimum / 10)")
    ax.axvline(result.recipe_lr, color="tab:orange", linestyle="--", label=f"the recipe's: {result.recipe_lr:.1e}")
    ax.set_xscale("log")
    finite = [s for s in t.smoothed if math.isfinite(s)]
    low = min(finite + [loss for loss in t.losses if math.isfinite(loss)])
    ax.set_ylim(low * 0.9, min(max(finite), DIVERGED * min(finite)) * 1.05)  # the divergence off the top
    ax.set_xlabel(f"learning rate of group {result.group!r} (the others keep the recipe's ratios)")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax.set_title(f"range test: {result.recipe} on {result.backbone}, stage {result.stage!r}")
    return save_figure(fig, path)


def report(result: LrFinderResult, log) -> None:
    t = result.test
    why = "the smoothed loss diverged" if t.diverged else "the planned steps were taken"
    log(f"range test of {result.recipe}'s stage {result.stage!r}: {len(t.lrs)} steps, group {result.group!r} from "
        f"{t.lrs[0]:.1e} to {t.lrs[-1]:.1e} ({why})")
    ratio = result.suggested_lr / result.recipe_lr
    log(f"suggested rate for group {result.group!r}: {result.suggested_lr:.1e} (a tenth of the rate at the lowest "
        f"smoothed loss); the recipe's: {result.recipe_lr:.1e} (suggested / recipe = {ratio:.3g})")
    others = {g: lr for g, lr in result.groups.items() if g != result.group}
    if others:
        log("the other groups at the recipe's ratios: " + ", ".join(f"{g} {lr * ratio:.1e} (recipe {lr:.1e})"
                                                                    for g, lr in others.items()))
    if edge := no_window(t):
        log(f"warning: the smoothed loss was lowest {NO_WINDOW[edge]} tested: the curve "
            f"shows no clear window, so the suggestion says little (more steps, or another range, may)")
    if result.folder is not None:
        log(f"-> {result.folder / 'lr_finder.png'}, {result.folder / 'lr_finder.csv'}  (a starting point to try, "
            f"not a tuned rate)")


def no_window(test: RangeTest) -> str | None:
    """"first" or "last" when the smoothed loss was lowest at an end of the sweep, else None.
    "first": lowest within a decade of the first rate, so the suggestion (a tenth of that rate)
    is below every rate tested: the loss never clearly fell (a loss that moves slowly, as from
    random weights, or one too noisy to show a dip, as with batches of 4), and where among the
    first few rates its noise put the minimum means nothing. "last": the sweep ended before the
    loss turned up. Either way the minimum is the sweep's edge, not a property of the network.
    A sweep that diverged did turn up, if at once (the step whose loss overflowed is not recorded):
    its last rate is where the curve turned, not an edge."""
    suggested, best = suggestion(test.lrs, test.smoothed)
    if suggested < test.lrs[0]:
        return "first"
    return "last" if best == len(test.lrs) - 1 and not test.diverged else None
