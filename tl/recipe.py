"""The Recipe: the numbers of one variant of the source documents, and the loss they imply.

A recipe file in `experiments/recipes/` holds a `RECIPE = Recipe(...)` with the numbers of its
source document and a `build(model, spec, recipe)` that decides which parameters train
and with which optimizer (see tl/models.py for the groups it names, tl/stages.py for a
recipe in several stages). `tl.engine.run` turns a recipe into a run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from tl.models import Backbone


@dataclass(frozen=True)
class Recipe:
    """The numbers of one variant from the source documents. A recipe file overrides only
    the fields that differ from these defaults, and says why. An unknown field is an error
    (the dataclass constructor rejects it)."""

    name: str  # registry key and run-folder prefix, e.g. "vgg_finetune"
    source: str  # document and section it reproduces, e.g. "002 §1.4"
    strategy: str  # one line: what trains
    backbone: str = "resnet18"  # the document's architecture; --backbone swaps it
    weights: str = "imagenet"  # "imagenet" (pretrained), "none" (random init) or a state_dict file
    lrs: dict[str, float] = field(default_factory=lambda: {"all": 1e-3})  # body/neck/head, or all
    train_epochs: int = 10  # epochs that train; the loop adds the validation-only epoch 0
    batch_size: int = 32
    frozen_bn_eval: bool = False  # keep frozen BatchNorm layers in eval mode while training
    loss: str = "cross_entropy"  # or "bce_logit" for a one-logit head
    stack_head: bool = False  # keep the ImageNet head, stack a new Linear(1000, n) on it (004 §3)
    bn_eval: bool = False  # every BatchNorm layer in eval mode (experiments/bn_policy.py)
    weight_decay: float | None = None  # for a build whose optimizer reads it (modern_finetune)
    label_smoothing: float = 0.0  # soft targets: 1-e on the label, e spread over all classes
    augment: str = "standard"  # train augmentation (tl/data.py): standard, tutorial or strong
    first_epochs: int = 0  # a staged recipe (tl/stages.py): its first stage's training epochs
    first_lrs: dict[str, float] | None = None  # that first stage's rates; `lrs`: the last stage's
    ema_decay: float = 0.0  # val and best.pth use an average of the weights (tl/engine/ema.py)
    tta: bool = False  # headline and predictions average a photo and its mirror (tl/engine/tta.py)

    @property
    def num_epochs(self) -> int:
        """The loop's `num_epochs` in 002's sense: the baseline epoch 0 plus the training epochs."""
        return self.train_epochs + 1


# (model, optimizer), (model, optimizer, scheduler) or (model, [Stage, ...]): see tl/stages.py
BuildFn = Callable[[nn.Module, Backbone, Recipe], tuple]


def make_criterion(recipe: Recipe, class_weights: torch.Tensor | None = None) -> nn.Module:
    """The loss the recipe implies. `class_weights` (one per class; `--class-weights auto`: the
    inverse class frequency) weigh each image's loss by its class, so a rare class counts as
    much as a common one; a single logit takes them as `pos_weight`, class 1's over class 0's."""
    if recipe.loss == "bce_logit":
        pos_weight = None if class_weights is None else class_weights[1:] / class_weights[0]
        return nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    return nn.CrossEntropyLoss(weight=class_weights, label_smoothing=recipe.label_smoothing)
