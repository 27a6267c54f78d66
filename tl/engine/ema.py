"""The average of the weights over the last training steps: an exponential moving average
(`--ema DECAY`, Recipe.ema_decay). Its sibling at test time, the average of the predictions
over a photo and its mirror, is tl/engine/tta.py.

Whether a recipe uses it is decided before training (a Recipe field) or on an inner split
of train by a tuner, never by comparing on the val or test images that score the headline: a
choice made by looking at those images would flatter the very number they give.

Each optimizer step follows one mini-batch's gradient, so the weights after the last step
carry the noise of the last few batches: they jitter around a good region instead of sitting
in it. An average of the weights over the last steps lies nearer the middle of that region,
where the loss changes slowly in every direction, and such flat regions tend to generalise
better (Polyak averaging; the EMA of timm's and torchvision's ImageNet recipes). After every
optimizer step

    average = decay * average + (1 - decay) * weights

so the weights of k steps ago count decay**k: the average remembers about 1 / (1 - decay)
steps (0.999: about the last 1000 updates; 0.99: the last 100). A run here takes a few
hundred steps (244 hymenoptera photos in batches of 32: 8 steps an epoch), so a decay like
0.99 fits; with 0.999 the average at the end would still be mostly the weights it started
from. It starts at the weights before training (the pretrained network with its untrained
head) and lags behind the training weights, most in the first epochs, whose val rows score
that lagging average. timm and torchvision warm the decay up over the first steps (or
`adjust` it to the run's length); this project keeps the plain formula. BatchNorm's running
mean and variance are averaged too (`use_buffers=True`): statistics close to, not exactly,
those the averaged weights would measure (SWA recomputes them with a pass over train; with a
decay near 1 the averaged statistics serve).

What the average is used for, so that what is saved and what is scored stay one model:

* every val row from epoch 0 on scores the average (the loop's `Hooks.validate_with`), so the
  best epoch, `best.pth` and the per-epoch files of `--save-every-epoch` are the average's
  weights, and the headline (test with the best epoch, or val with the final one) scores them;
* the training weights go on training; `last.ckpt` holds both, and the average's state
  (with `n_averaged`), so `--resume` continues the same average;
* a staged recipe (tl/stages.py) keeps one average over all its stages;
* under the feature cache the loop trains the head alone, on the model's own parameters; the
  average is of the whole model, whose frozen prefix stays exactly as it was, so the cached
  features serve the averaged head too (`val_net`);
* under torchrun every process averages its unwrapped module. The weights are the same in all
  processes, the BatchNorm statistics are not (each saw its own batches) until DDP copies process
  0's at the next forward; the update makes that copy first, so all processes average one model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from tl import TLError
from tl.engine import distributed
from tl.engine.checkpoint import check_ema_state
from tl.features import FeaturesOrImages, split_at_cut
from tl.models import Backbone


def check_decay(decay: float, name: str = "ema_decay") -> float:
    """A decay in (0, 1): 0 would copy the latest weights, 1 never move from the first."""
    if not 0 < decay < 1:
        raise TLError(f"{name} {decay}: the decay of an average of the weights lies strictly between 0 and 1 "
                      f"(0.99 remembers about the last 100 steps, 0.999 the last 1000)")
    return decay


def weight_average(model: nn.Module, decay: float, ckpt: dict | None = None) -> AveragedModel | None:
    """The exponential average of `model`'s weights and BatchNorm buffers, starting at its current
    weights (or, for a resumed run, as its checkpoint saved it); None when `decay` is 0 (off)."""
    if not decay:
        if ckpt is not None and ckpt.get("ema") is not None:
            raise TLError("this checkpoint holds an average of the weights, though its run asks for none: "
                          "the file was edited or comes from another run")
        return None
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(check_decay(decay)), use_buffers=True)
    ema.module.requires_grad_(False)  # it is computed, never trained
    ema.update_parameters(model)  # the first update copies: the average starts at the weights before training
    if ckpt is not None:
        if ckpt.get("ema") is None:
            raise TLError("this checkpoint holds no average of the weights, though its run asks for one")
        check_ema_state(ckpt["ema"])
        try:
            ema.load_state_dict(ckpt["ema"])
        except RuntimeError as exc:  # missing or extra layers, other shapes
            raise TLError(f"this checkpoint's average of the weights does not fit its model: the file was edited "
                          f"or damaged ({str(exc).strip().splitlines()[-1].strip()[:160]})") from None
    return ema


def update_after_step(ema: AveragedModel, model: nn.Module) -> Callable[[int], None]:
    """The step callback: fold the weights after this optimizer step into the average. It returns
    None, since an `after_step` that returns True stops training."""

    def update(epoch: int) -> None:
        distributed.broadcast_buffers(model)  # [DDP] process 0's BatchNorm statistics, as its next forward copies them
        ema.update_parameters(model)

    return update


def val_net(ema: AveragedModel, loop_net: nn.Module, spec: Backbone, device, channels_last: bool) -> nn.Module:
    """The averaged model in the form the loop feeds it: the averaged whole model, or, where the
    stage reads stored features (`FeaturesOrImages`), the averaged head for features and the
    averaged model for images."""
    ema.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    if isinstance(loop_net, FeaturesOrImages):
        return FeaturesOrImages(ema.module, split_at_cut(ema.module, spec).tail)
    return ema.module
