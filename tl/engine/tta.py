"""Test-time augmentation (`--tta`, Recipe.tta): the average of the predictions over a photo
and its left-right mirror.

Whether a recipe uses it is decided before training (a Recipe field) or on an inner split
of train by a tuner, never by comparing on the val or test images that score the headline: a
choice made by looking at those images would flatter the very number they give.

A photo of a bee mirrored left-right is still a photo of a bee, which is why training flips
photos at random. So at test time the network can look twice, at the centre crop and at its
mirror, and average its two probabilities (softmax over the classes; for a single logit, the
sigmoid): errors that depend on one view partly cancel. The mirror is a fair view only where
the label survives it: not for text or digits (a mirrored "b" is a "d"), nor for left and
right turn signs. It costs two forward passes per image. The headline, `--evaluate` and
`--predict` use it when a run's recipe says so (or `--tta`); the loop's per-epoch val rows
stay the plain forward pass (cached val features have no mirror).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tl import TLError


class Mirrored(nn.Module):
    """Test-time augmentation: `model` on the images and on their left-right mirrors, the two
    probabilities averaged. It returns logits of the averaged probabilities (log p for several
    classes, log(p / (1 - p)) for a single logit), so a loss, `predictions` and
    `class_probabilities` treat it as any model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise TLError("test-time mirroring needs images (B, 3, H, W), not stored features")
        return averaged_logits([self.model(x).float(), self.model(torch.flip(x, dims=[3])).float()])


def averaged_logits(outputs: list[torch.Tensor]) -> torch.Tensor:
    """Logits whose probabilities are the mean of the views' probabilities, computed in log space
    (a sum of exponentials, `logsumexp`) so that a confident view gives no log(0)."""
    views = math.log(len(outputs))
    if outputs[0].shape[1] == 1:  # one logit z: P(class 1) = sigmoid(z), P(class 0) = sigmoid(-z)
        log_p1 = torch.logsumexp(torch.stack([nn.functional.logsigmoid(z) for z in outputs]), 0) - views
        log_p0 = torch.logsumexp(torch.stack([nn.functional.logsigmoid(-z) for z in outputs]), 0) - views
        return log_p1 - log_p0
    return torch.logsumexp(torch.stack([z.log_softmax(1) for z in outputs]), 0) - views


def mirrored_if(model: nn.Module, tta: bool) -> nn.Module:
    return Mirrored(model).eval() if tta else model
