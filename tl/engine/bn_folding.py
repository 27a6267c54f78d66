"""BatchNorm folded into the convolution before it: the feature pass's one speed-up of the
backbone (tl/engine/feature_store.py runs a folded copy; the model that trains is untouched).

Exact up to float rounding while the BatchNorm statistics are frozen, which is exactly when
features are cacheable (tl/features.py decides that).
"""

from __future__ import annotations

import torch
from torch import nn

from tl.models import BATCHNORM

try:  # timm's BatchNorm + dropout + activation in one module (EfficientNet-Lite0's layers)
    from timm.layers import BatchNormAct2d

    _BN_ACT: tuple[type, ...] = (BatchNormAct2d,)
except ImportError:
    _BN_ACT = ()


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model` (in eval mode) with each BatchNorm that directly follows a convolution
    merged into that convolution's weights; `model` itself if it has no BatchNorm. The
    original is never changed.

    In eval mode BatchNorm is a fixed per-channel affine map, y = (x - mean) / sqrt(var + eps)
    * gamma + beta, and a convolution is linear, so the two collapse into one convolution with
    rescaled weights and a bias (`torch.nn.utils.fusion.fuse_conv_bn_eval` does the algebra).
    That is only valid while the statistics are frozen, which is exactly when features are
    cacheable; it saves the BatchNorm passes over the activations (about a third of
    EfficientNet-Lite0's inference time on this CPU). Results equal the unfolded network up to
    float rounding. Which BatchNorm follows which convolution is read from the traced graph
    (torch.fx), never guessed from module names; a model that cannot be traced stays unfolded.
    """
    import copy

    from torch.fx import Tracer
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    class BatchNormAsLeaf(Tracer):  # keep BatchNorm layers as single nodes in the graph
        def is_leaf_module(self, m: nn.Module, name: str) -> bool:
            return isinstance(m, BATCHNORM) or super().is_leaf_module(m, name)

    try:
        graph = BatchNormAsLeaf().trace(model)  # reads the model, changes nothing
    except Exception:  # dynamic control flow etc.: not traceable, not folded
        return model
    modules = dict(model.named_modules())
    pairs = []  # (convolution name, BatchNorm name)
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        conv = node.args[0] if node.args else None
        if (type(bn) in (nn.BatchNorm2d, *_BN_ACT) and isinstance(conv, torch.fx.Node) and conv.op == "call_module"
                and isinstance(modules[conv.target], nn.Conv2d)
                and len(conv.users) == 1):  # the convolution's output feeds only this BatchNorm
            pairs.append((conv.target, node.target))
    if not pairs:
        return model  # nothing to fold (VGG16): no copy of its 138M parameters
    folded = copy.deepcopy(model).eval()
    for conv_name, bn_name in pairs:
        bn = folded.get_submodule(bn_name)
        folded.set_submodule(conv_name, fuse_conv_bn_eval(folded.get_submodule(conv_name), bn))
        # what the BatchNorm module did besides normalising stays: timm's BatchNormAct2d
        # applies its dropout and activation after the BatchNorm
        folded.set_submodule(bn_name, nn.Sequential(bn.drop, bn.act) if type(bn) in _BN_ACT else nn.Identity())
    return folded
