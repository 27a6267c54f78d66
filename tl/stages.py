"""Stages and learning-rate schedules: what a recipe may ask of the one loop beyond "train".

A recipe's `build(model, spec, recipe)` returns either

    (model, optimizer)                  one stage, a constant learning rate per group
    (model, optimizer, scheduler)       one stage, an epoch schedule (StepLR: the PyTorch tutorial)
    (model, [Stage, Stage, ...])        stages run in sequence, each with its own plan

A `Stage` says what trains and how: `setup(model, spec, recipe)` sets `requires_grad` and
returns the optimizer; `schedule(optimizer, epochs, steps_per_epoch)` returns the
learning-rate scheduler (or the stage has none), stepped after every epoch or, with
`interval="step"`, after every batch. fastai's `fine_tune` is the standard example:

    stage 1  "frozen body"   1 epoch,  only the head (and BatchNorm) trains, one-cycle schedule
    stage 2  "everything"    the rest, everything trains at discriminative rates, one-cycle again

`tl.engine.run.run` calls `tl.loop.train_model` once per stage with the same History, so the
epochs count on across stages and the best epoch is chosen over the whole run. Each stage
is set up only when it starts: its trainable set decides whether the feature cache is
exact (a frozen-body stage can train on stored features, the unfrozen one cannot), and its
optimizer starts fresh (fastai's `fine_tune` keeps one optimizer across both). The checkpoint
records the stage, so `--resume` continues in the right one with its optimizer and
schedule state, or starts the next one fresh when the run stopped at a boundary.

Nothing here knows any recipe; `experiments/` builds the stages.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR


@dataclass
class Stage:
    """One stage of a recipe. The last stage, and one with `epochs=None`, takes what the recipe's
    total leaves over (so `--epochs N` changes the last stage); a fixed count is capped by it."""

    name: str  # what this stage does, for the log and config.json: "frozen body", "everything"
    setup: Callable  # (model, spec, recipe) -> optimizer; sets requires_grad first
    epochs: int | None = None  # training epochs of this stage; None: the rest of the recipe's total
    schedule: Callable | None = None  # (optimizer, epochs, steps_per_epoch) -> scheduler
    interval: str = "epoch"  # step the schedule after every "epoch" or every "step" (batch)
    frozen_bn_eval: bool | None = None  # frozen BatchNorm layers in eval mode; None: the recipe's
    bn_eval: bool | None = None  # every BatchNorm layer in eval mode; None: the recipe's


@dataclass
class Span:
    """A stage placed on the loop's epoch axis: it runs loop epochs `start .. end-1`
    (`train_model(..., num_epochs=end, history)` with a History that ends at epoch `start - 1`).
    The first stage starts at the validation-only epoch 0, so it holds `epochs + 1` loop epochs."""

    index: int  # position in the recipe's list of stages (what the checkpoint records)
    stage: Stage
    start: int
    end: int

    @property
    def epochs(self) -> int:
        """Training epochs in this span (the baseline epoch 0 trains nothing)."""
        return self.end - max(self.start, 1)


def as_stages(built: tuple) -> tuple[torch.nn.Module, list[Stage]]:
    """(model, stages) from whatever `build` returned (see the module docstring)."""
    model, second, *rest = built
    if isinstance(second, (list, tuple)):
        return model, list(second)
    optimizer, scheduler = second, (rest[0] if rest else None)  # built: the stage hands them over
    return model, [Stage("train", setup=lambda *_: optimizer,
                         schedule=(lambda *_: scheduler) if scheduler is not None else None)]


def place(stages: list[Stage], train_epochs: int) -> list[Span]:
    """Lay the stages on the loop's epochs, in order, until `train_epochs` are used up. A
    stage left with no epoch (a smoke run of 1 epoch, say) is dropped from the plan."""
    spans, used, end = [], 0, 1  # loop epoch 0 is the baseline; training epochs are 1..train_epochs
    for i, stage in enumerate(stages):
        last = i == len(stages) - 1
        left = train_epochs - used
        n = left if stage.epochs is None or last else min(stage.epochs, left)
        if n > 0:
            spans.append(Span(i, stage, 0 if not spans else end, end + n))
            used, end = used + n, end + n
    return spans


def describe(span: Span, optimizer: torch.optim.Optimizer, scheduler) -> dict:
    """The record of one stage in config.json: its epochs, what trains and at which rates
    (a one-cycle group's peak rate, `max_lr`, rather than its momentary one)."""
    groups = [{"name": g.get("name", str(i)), "lr": g.get("max_lr", g.get("initial_lr", g["lr"])),
               "params": sum(p.numel() for p in g["params"])}
              for i, g in enumerate(optimizer.param_groups)]
    return {"name": span.stage.name, "train_epochs": [max(span.start, 1), span.end - 1],
            "optimizer": type(optimizer).__name__, "param_groups": groups,
            "trainable_params": sum(g["params"] for g in groups),
            "schedule": type(scheduler).__name__ if scheduler is not None else "constant",
            "interval": span.stage.interval}


# ----------------------------------------------------------------------------- schedules
def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                  final_fraction: float = 0.0) -> LambdaLR:
    """Linear warmup to each group's rate, then a half cosine down to `final_fraction` of it.

    For step s (0-based, one per batch) and a group's rate lr:

        s <  W:   lr * (s + 1) / W                                        warmup (Goyal et al. 2017)
        s >= W:   lr * (f + (1 - f) * (1 + cos(pi * (s - W) / (T - W))) / 2)   cosine (Loshchilov &
                                                                          Hutter, SGDR, 2017)

    Warmup keeps the first, large gradients of a new random head from shaking the
    pretrained body while Adam's moment estimates are still noise; the cosine spends most
    steps at a moderate rate and ends near zero, where the weights settle. A LambdaLR is
    the shortest way to write it exactly; its state (the step count) is what a checkpoint
    saves, and the function is rebuilt from the recipe on resume."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_fraction + (1 - final_fraction) * (1 + math.cos(math.pi * progress)) / 2

    return LambdaLR(optimizer, factor)


def one_cycle(optimizer: torch.optim.Optimizer, total_steps: int, pct_start: float = 0.25,
              div: float = 25.0, div_final: float = 1e5) -> OneCycleLR:
    """fastai's `fit_one_cycle` schedule with torch's `OneCycleLR` (Smith & Topin 2018).

    The rate climbs from lr/`div` to each group's lr (the optimizer's rates are the peaks)
    for `pct_start` of the steps, then falls to lr/`div_final`, both along half cosines;
    the momentum (Adam's beta1) moves the other way, 0.95 -> 0.85 -> 0.95.

    Where torch's differs from fastai's: torch names the end rate relative to the *start*
    (`final_div_factor`: end = start / final_div_factor), fastai relative to the peak
    (`div_final`: end = peak / div_final), so we pass final_div_factor = div_final / div;
    torch puts the peak at step `pct_start * total_steps - 1` and counts the second phase
    to `total_steps - 1`, fastai splits its fraction of iterations at `pct_start`, so the
    peak can sit one step apart; and torch steps the schedule *after* each batch, from the
    start rate, exactly as fastai's callback sets it *before* each batch."""
    peaks = [g["lr"] for g in optimizer.param_groups]
    return OneCycleLR(optimizer, max_lr=peaks, total_steps=total_steps, pct_start=pct_start,
                      div_factor=div, final_div_factor=div_final / div, anneal_strategy="cos",
                      cycle_momentum=True, base_momentum=0.85, max_momentum=0.95)
