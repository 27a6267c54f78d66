"""Can the network take, and see, images of `--image-size` pixels? Checked once, before training.

A size can be too small in two ways:

* the network cannot take it: its downsampling leaves nothing for a later layer (VGG16 below
  32 pixels), and the forward pass fails;
* the network takes it and sees nothing: EfficientNet-Lite's ReLU6 layers, fed the few
  activations left at 24 or 32 pixels, output zero everywhere, so every photo gets the same
  all-zero features and a frozen run trains at chance without a word. `python -m
  benchmarks.blind_sizes` measures where this happens (results/blind_sizes.md): on
  hymenoptera's 153 val photos, Lite0 at 24 and 32 pixels (150 or more all-zero; 17-20 at 8
  and 16), Lite2 at 32 and below (141 or more), Lite1 for 29 photos at 32; never for a
  random-init ResNet18, VGG16 or timm MobileNetV3 at the sizes they take.

The check pushes a few of the run's own val photos through the network in eval mode with no
gradient (no weight, statistic or random state moves) and looks at the features its head
receives: a photo whose features are all zero, or photos whose features are all identical,
mean the network cannot see at this size. It looks at 16 photos, not all: a size at which only
a few photos go blind can pass. It then names the smallest larger size at which
the same photos do give features.
"""

from __future__ import annotations

import torch
from torch import nn

from tl import TLError
from tl.data import build_transforms
from tl.models import Backbone, StackedHead

PROBE_PHOTOS = 16  # val photos, spread over the folder, pushed through the network
STEP = 8  # looking for a size that works: every size up to 2 STEP above, then every STEP-th


def check_image_size(model: nn.Module, spec: Backbone, backbone: str, size: int, val_set=None) -> None:
    """A TLError, before any training, where `model` cannot take or cannot see `size`-pixel
    images; `val_set` (a dataset with `samples` and `loader`) gives the photos to look with,
    None only checks that the network takes the size."""
    files = _probe_files(val_set)
    problem = _problem(model, spec, size, files, val_set)
    if problem is None:
        return
    largest = max(size, spec.image_size)
    tried = sorted({*range(size + 1, size + 2 * STEP + 1), *range(size + STEP, largest + 1, STEP), largest})
    larger = next((s for s in tried if s <= largest and _problem(model, spec, s, files, val_set) is None), None)
    if larger is None:
        raise TLError(f"{backbone} {problem} (--image-size {size}), and at every larger size up to {largest} "
                      f"too: its weights see nothing in these photos (a damaged --weights file?)")
    raise TLError(f"{backbone} {problem} (--image-size {size}); the smallest larger size "
                  f"at which it works on these photos is {larger} (--image-size {larger} or more)")


def _probe_files(val_set) -> list[str]:
    if val_set is None or len(val_set.samples) < 2:
        return []
    n = len(val_set.samples)
    return [val_set.samples[i][0] for i in range(0, n, max(1, n // PROBE_PHOTOS))][:PROBE_PHOTOS]


def _problem(model: nn.Module, spec: Backbone, size: int, files: list[str], val_set) -> str | None:
    """None when the network takes `size` and, given photos, gives them features; else why not."""
    if files:
        transform = build_transforms(spec.mean, spec.std, size=size, augment=False)["val"]
        x = torch.stack([transform(val_set.loader(f)) for f in files])
    else:
        x = torch.zeros(1, 3, size, size)
    try:
        features = head_input(model, spec, x)
    except RuntimeError as exc:
        return f"cannot take {size}-pixel images: its downsampling leaves too little ({str(exc).splitlines()[0][:120]})"
    if not files:
        return None
    zero = int((features.abs().amax(1) == 0).sum())
    if zero:
        return (f"sees nothing at {size}-pixel images: {zero} of {len(files)} val photos give all-zero "
                f"features (the input of its head), so training would stay at chance")
    if bool((features == features[0]).all()):
        return f"sees nothing at {size}-pixel images: {len(files)} different val photos give identical features"
    return None


def head_input(model: nn.Module, spec: Backbone, x: torch.Tensor) -> torch.Tensor:
    """The features the head receives for images `x`, one row per image, with the model in eval
    mode and no gradient; every module's mode is restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    seen = []
    head = ("pretrained_model." if isinstance(model, StackedHead) else "") + spec.head  # a stacked head: the inner one
    hook = model.get_submodule(head).register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model.eval()(x.to(next(model.parameters()).device))
    finally:
        hook.remove()
        for m, mode in modes.items():
            m.training = mode
    return seen[0].flatten(1).float().cpu()
