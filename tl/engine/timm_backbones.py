"""Any timm model as a backbone: `--backbone timm:convnext_tiny`, `timm:resnet50`, ...
(tl/engine/backbones.py looks up every `--backbone` name and comes here for `timm:`.)

The registry in tl/models.py names each backbone's parts by hand. For the hundreds of
architectures in timm (https://github.com/huggingface/pytorch-image-models) the same
`Backbone` is read off the model itself, created with random weights (no network):

    head   the classifier timm names in `pretrained_cfg["classifier"]`: it must be one Linear
           (ConvNeXt's is `head.fc`, not the whole `head`, which also holds a LayerNorm)
    neck   the last stage in `feature_info` (timm's list of the layers each resolution's
           features come out of) and every layer with parameters after it except the head:
           ConvNeXt's `head.norm`, EfficientNet's `conv_head` and `bn2`
    body   everything else, so every parameter lands in exactly one group
    mean, std, image_size  from `pretrained_cfg`: what the ImageNet weights were trained on

Pretrained weights come from `--weights PATH` (a state_dict of the same timm model) or,
online, `--weights imagenet` through timm's own download (tl.engine.weights.load_imagenet).
"""

from __future__ import annotations

import difflib
import functools

from torch import nn

from tl import TLError
from tl.models import Backbone

PREFIX = "timm:"


@functools.lru_cache(maxsize=16)  # a run asks several times; building the spec creates the model once
def timm_spec(name: str) -> Backbone:
    """The Backbone of `timm:ARCH` (see the module docstring); a TLError where timm has no such
    model or its parts cannot be named."""
    import timm

    arch = name.removeprefix(PREFIX)
    if not arch or not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = (f"did you mean {', '.join(PREFIX + c for c in close)}?" if close
                else "timm.list_models('*convnext*') lists the names")
        raise TLError(f"timm has no model {arch!r} (--backbone {name}); {hint}")
    model = timm.create_model(arch, pretrained=False)
    cfg = model.pretrained_cfg
    head = _classifier(model, name, cfg.get("classifier"))
    neck = _neck(model, name, head)
    if len(cfg.get("mean", ())) != 3 or len(cfg.get("std", ())) != 3:
        raise TLError(f"{name} does not take RGB images (its mean is {cfg.get('mean')})")
    # a vision transformer cuts the image into a fixed grid of patches: let it take other sizes (--quick's 64)
    fixed = getattr(getattr(model, "patch_embed", None), "strict_img_size", False)
    options = {"dynamic_img_size": True} if fixed else {}
    create = functools.partial(timm.create_model, arch, pretrained=False, **options)
    return Backbone(name, create, head=head, neck=neck,
                    mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), weights_source="timm", cache_cut=head,
                    image_size=int(cfg["input_size"][-1]))


def _classifier(model: nn.Module, name: str, head) -> str:
    """The dotted name of the final Linear layer, checked."""
    if not isinstance(head, str):  # e.g. a distilled model's two heads ("head", "head_dist")
        raise TLError(f"{name} has the classifier(s) {head!r}; a backbone here needs exactly one Linear head")
    layer = dict(model.named_modules()).get(head)
    if not isinstance(layer, nn.Linear):
        raise TLError(f"{name}'s classifier {head} is a {type(layer).__name__}, not a Linear layer: "
                      f"it cannot be replaced by a new Linear with one output per class")
    return head


def _neck(model: nn.Module, name: str, head: str) -> tuple[str, ...]:
    """The last feature stage and the layers with parameters after it, the head excepted."""

    def under(param: str, prefix: str) -> bool:
        return param == prefix or param.startswith(prefix + ".")

    stages = [f["module"] for f in getattr(model, "feature_info", None) or []]
    names = [n for n, _ in model.named_parameters()]
    start = next((i for i, n in enumerate(names) if stages and under(n, stages[-1])), None)
    if start is None or start == 0:
        raise TLError(f"{name}: timm's feature_info names no last stage with parameters after a first one "
                      f"({stages[-1:] or 'no feature_info'}), so its body and neck cannot be told apart")
    neck = [stages[-1]]
    for param in names[start:]:
        owner = param.rpartition(".")[0] or param  # a parameter of the model itself: its own name
        if not under(param, head) and not any(under(param, p) for p in neck):
            neck.append(owner)
    return tuple(neck)
