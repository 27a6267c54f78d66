"""Every `--backbone` name to its Backbone: the registry's in tl/models.py, or, for
`timm:NAME`, one read off the timm model (tl/engine/timm_backbones.py).
"""

from __future__ import annotations

from tl import TLError
from tl.engine.timm_backbones import PREFIX, timm_spec
from tl.models import BACKBONES, Backbone, get_backbone


def backbone_spec(name: str) -> Backbone:
    """The Backbone of a `--backbone` name: the registry's (tl.models.BACKBONES), or one read
    from timm for `timm:NAME`."""
    if name.startswith(PREFIX):
        return timm_spec(name)
    if name not in BACKBONES:
        raise TLError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}, "
                      f"or timm:NAME for a timm model (e.g. timm:convnext_tiny)")
    return get_backbone(name)


def folder_label(backbone: str) -> str:
    """A backbone's name as part of a file or folder name: `timm:resnet50` -> `timm-resnet50`."""
    return backbone.replace(":", "-")
