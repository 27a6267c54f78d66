"""Frozen features: when only the head trains, run the frozen backbone once, not every epoch.

In a frozen-backbone recipe (`resnet_frozen`, `vgg_transfer`) every epoch pushes the same
images through the same frozen network to train a layer of a few thousand parameters:
nearly all the compute is spent recomputing numbers that cannot change. So we split the
network at a *cut point* (the backbone's `cache_cut`, e.g. ResNet's `fc`):

    image --[ frozen prefix, eval mode ]--> feature vector --[ tail: trains ]--> logits
              computed once, stored                          the loop trains this

and hand the loop the tail as `net` and DataLoaders of stored features instead of images.
The loop itself does not change: tl/loop.py trains the tail as it trains any network.

When is that exact? The prefix must be a fixed function during training: no trainable
parameter in it, and in the loop's train-mode setup (`net.train()`, then the BatchNorm layers
that `tl.models.eval_batchnorm` names back in eval mode) it must compute exactly what it
computes in eval mode and change none of its buffers. That is not decided from module types
(Dropout, Dropout2d, StochasticDepth, DropPath, BatchNorm in train mode, and whatever
module comes next): `check_prefix_is_fixed` *tries it* on a few images, and caches only if
the outputs agree bit for bit and every buffer stays as it was. Dropout *after* the cut
keeps working as in training, which is why VGG16 cuts before `classifier.2` (a Dropout)
rather than at `classifier.6`. Then:

* val features are always exact (the val transform is deterministic);
* train features are exact when augmentation is off (`--no-augment`);
* with augmentation, `--cache-views K` precomputes K random crops/flips per image and
  each epoch draws one of them per image: an approximation, said as such in the results.

The one-time pass runs a copy of the network with each frozen BatchNorm folded into the
convolution before it (tl/engine/bn_folding.py); a cached phase needs no other backbone pass.
Where the features are computed, stored, checked and found again is the machinery's job
(tl/engine/feature_store.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from tl.models import Backbone, StackedHead, eval_batchnorm


class StopForward(Exception):
    """Raised by a forward hook once the cut point's input is captured: the rest is not run."""


@dataclass
class CacheSplit:
    tail: nn.Module  # the part that trains, sharing its parameters with the full model
    cut: str  # the dotted name of the first module of the tail

    @property
    def feature_dim(self) -> int:
        """Size of one stored feature vector: the input of the tail's first Linear layer
        (Dropout before it keeps the size)."""
        return next(m.in_features for m in self.tail.modules() if isinstance(m, nn.Linear))


def split_at_cut(model: nn.Module, spec: Backbone) -> CacheSplit:
    """The tail of `model` from `spec.cache_cut` on. "fc" -> model.fc; "classifier.2" ->
    Sequential(classifier[2], ..., classifier[-1]): the same module objects, so training the
    tail trains the model."""
    if isinstance(model, StackedHead):  # 004 §3: only the stacked Linear(1000, 1) trains
        return CacheSplit(model.dense, "dense")
    parent_name, _, last = spec.cache_cut.rpartition(".")
    if last.isdigit():
        parent = model.get_submodule(parent_name)
        return CacheSplit(nn.Sequential(*list(parent)[int(last):]), spec.cache_cut)
    return CacheSplit(model.get_submodule(spec.cache_cut), spec.cache_cut)


def why_not_cacheable(model: nn.Module, split: CacheSplit, frozen_bn_eval: bool,
                      probe: torch.Tensor, bn_eval: bool = False) -> str | None:
    """None if the prefix is a fixed function during training, else the reason it is not:
    a parameter before the cut trains, or `check_prefix_is_fixed` fails on `probe` (a few val
    images). `frozen_bn_eval` and `bn_eval` are the loop's (`Hooks`)."""
    tail = {id(p) for p in split.tail.parameters()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in tail]
    if trainable:
        return f"parameters before the cut point {split.cut} train (e.g. {trainable[0]})"
    return check_prefix_is_fixed(model, split, frozen_bn_eval, probe, bn_eval)


@torch.no_grad()
def forward_to(model: nn.Module, cut: str, images: torch.Tensor) -> torch.Tensor:
    """The input of the module `cut` when `model` runs on `images`, in its current mode: a
    pre-hook takes it and raises `StopForward`, so nothing from the cut on runs or changes."""
    captured = []

    def hook(module, inputs):
        captured.append(inputs[0])
        raise StopForward

    handle = model.get_submodule(cut).register_forward_pre_hook(hook)
    try:
        model(images)
    except StopForward:
        pass
    finally:
        handle.remove()
    return captured[0]


def check_prefix_is_fixed(model: nn.Module, split: CacheSplit, frozen_bn_eval: bool,
                          probe: torch.Tensor, bn_eval: bool = False) -> str | None:
    """Run the prefix on `probe` as the loop would train it (`model.train()`, then the layers of
    `eval_batchnorm` back in eval mode, as tl/loop.py does) and compare with eval mode: two
    passes with different seeds must both equal the eval pass bit for bit (a Dropout, a
    stochastic depth or batch statistics break that) and leave every buffer as it was; and
    the tail alone must turn the prefix's output into the model's. The model's buffers, mode
    and the CPU's global RNG are restored afterwards, whatever happens."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[]):
            model.eval()
            reference = forward_to(model, split.cut, probe).clone()
            with torch.no_grad():
                tail_out = split.tail(reference)
                tail_ends = torch.allclose(tail_out, model(probe), rtol=1e-4, atol=1e-5)
            passes = []
            for seed in (1, 2):
                torch.manual_seed(seed)
                model.train()
                for bn in eval_batchnorm(model, frozen_bn_eval, bn_eval):
                    bn.eval()
                passes.append(forward_to(model, split.cut, probe).clone())
        changed = [n for n, b in model.named_buffers() if not torch.equal(b, buffers[n])]
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        model.train(was_training)
    if not tail_ends:
        return (f"the model computes more after {split.cut} than {split.cut} itself: its output "
                "cannot be cached there")
    if changed:
        return (f"{changed[0]} changes in training (a BatchNorm in train mode updates its "
                "statistics)")
    if not all(torch.equal(p, reference) for p in passes):
        return (f"the layers before {split.cut} compute something else in training than in "
                "evaluation (Dropout, stochastic depth or BatchNorm batch statistics)")
    return None


class FeatureSet(Dataset):
    """Stored features (views, N, D) and their labels; each access draws one of the views
    with torch's global RNG (so the draw is seeded and restored on resume like any other).
    `on_disk` is the cache file when `features` is memory-mapped from it rather than in memory."""

    def __init__(self, features: torch.Tensor, targets: torch.Tensor, on_disk: Path | None = None):
        self.features, self.targets, self.on_disk = features, targets, on_disk

    def __len__(self) -> int:
        return self.features.shape[1]

    def __getitem__(self, i: int):
        v = int(torch.randint(self.features.shape[0], ())) if self.features.shape[0] > 1 else 0
        return self.features[v, i].float(), int(self.targets[i])


class FeaturesOrImages(nn.Module):
    """The `net` handed to the loop when some phase is cached: stored feature vectors (B, D)
    go through the tail only, images (B, 3, H, W) through the whole model. Both paths use
    the same parameters, so a phase may be cached while the other is not (e.g. val cached,
    augmented train images not)."""

    def __init__(self, model: nn.Module, tail: nn.Module):
        super().__init__()
        self.model, self.tail = model, tail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(x) if x.dim() == 2 else self.model(x)

    def state_dict(self, *args, **kwargs):
        """The model's own state_dict (the tail's tensors are the model's): the loop's copy of
        the best epoch then loads straight into the model and goes to best.pth as it is."""
        return self.model.state_dict(*args, **kwargs)

