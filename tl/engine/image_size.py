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

The check pushes the run's own val photos through the network in eval mode with no gradient
(no weight, statistic or random state moves) and looks at the features its head receives: a
photo whose features are all zero, or photos whose features are all identical, mean the network
cannot see at this size. Blindness can take only some photos (Lite1 at 28 pixels: 24 of the 153),
so below the backbone's own size, where it happens, the check looks at every val photo, up to
`PROBE_BELOW` spread over the folder (a share of 1 in 100 blind photos is then missed with a
chance of about 0.6% at 512 photos); at its own size and above, at `PROBE_PHOTOS` spread over the
folder. It then names the smallest larger size at which every one of those photos gives features,
trying the photos that went blind first, so a size that fails costs only them.

The cost, on one CPU thread (process time, this project's 2-core machine): 64 photos through
EfficientNet-Lite0 at 224 pixels take 3.8 s (16 took 1.2 s; reading the 64 JPEGs is 0.4 s of
it), and Lite1 at 28 pixels on all 153 hymenoptera val photos, search included, takes 3.1 s. On
a GPU the forward passes are milliseconds and reading the photos is most of it.
"""

from __future__ import annotations

import torch
from torch import nn

from tl import TLError
from tl.data import build_transforms
from tl.models import Backbone, StackedHead

PROBE_PHOTOS = 64  # val photos, spread over the folder, at the backbone's own size and above
PROBE_BELOW = 512  # below it, where networks go blind: every val photo, up to this many, spread
BATCH = 32  # photos per forward pass
STEP = 8  # looking for a size that works: every size up to 2 STEP above, then every STEP-th


def check_image_size(model: nn.Module, spec: Backbone, backbone: str, size: int, val_set=None) -> None:
    """A TLError, before any training, where `model` cannot take or cannot see `size`-pixel
    images; `val_set` (a dataset with `samples` and `loader`) gives the photos to look with,
    None only checks that the network takes the size."""
    files = _probe_files(val_set, PROBE_PHOTOS if size >= spec.image_size else PROBE_BELOW)
    problem, blind = _problem(model, spec, size, files, val_set)
    if problem is None:
        return
    largest = max(size, spec.image_size)
    tried = sorted({*range(size + 1, size + 2 * STEP + 1), *range(size + STEP, largest + 1, STEP), largest})
    larger = None
    for candidate in (s for s in tried if s <= largest):
        problem_there, blind_there = "", _problem(model, spec, candidate, blind, val_set, first_only=True)[1]
        if not blind_there:  # the photos that went blind see at this size: do all the others?
            problem_there, blind_there = _problem(model, spec, candidate, files, val_set, first_only=True)
        if problem_there is None:
            larger = candidate
            break
        blind = blind_there or blind
    if larger is None:
        raise TLError(f"{backbone} {problem} (--image-size {size}), and at every larger size up to {largest} "
                      f"too: its weights see nothing in these photos (a damaged --weights file?)")
    raise TLError(f"{backbone} {problem} (--image-size {size}); the smallest larger size "
                  f"at which it works on these photos is {larger} (--image-size {larger} or more)")


def _probe_files(val_set, most: int) -> list[str]:
    """Up to `most` val photos, spread evenly over the folder (all of them, where there are fewer)."""
    if val_set is None or len(val_set.samples) < 2:
        return []
    n = len(val_set.samples)
    return [val_set.samples[i * n // most][0] for i in range(most)] if n > most else [f for f, _ in val_set.samples]


def _problem(model: nn.Module, spec: Backbone, size: int, files: list[str], val_set,
             first_only: bool = False) -> tuple[str | None, list[str]]:
    """(None when the network takes `size` and, given photos, gives them features, else why not;
    the photos whose features are all zero). `first_only` stops at the first batch with one."""
    if not files:
        try:
            head_input(model, spec, torch.zeros(1, 3, size, size))
        except RuntimeError as exc:
            return _cannot_take(size, exc), []
        return None, []
    transform = build_transforms(spec.mean, spec.std, size=size, augment=False)["val"]
    blind, first, identical = [], None, True
    for start in range(0, len(files), BATCH):
        batch = files[start:start + BATCH]
        try:
            features = head_input(model, spec, torch.stack([transform(val_set.loader(f)) for f in batch]))
        except RuntimeError as exc:
            return _cannot_take(size, exc), []
        blind += [f for f, row in zip(batch, features) if row.abs().amax() == 0]
        first = features[0] if first is None else first
        identical = identical and bool((features == first).all())
        if blind and first_only:
            break
    if blind:
        return (f"sees nothing at {size}-pixel images: {len(blind)} of {len(files)} val photos give all-zero "
                f"features (the input of its head), so training would stay at chance"), blind
    if identical:
        return f"sees nothing at {size}-pixel images: {len(files)} different val photos give identical features", []
    return None, []


def _cannot_take(size: int, exc: RuntimeError) -> str:
    return f"cannot take {size}-pixel images: its downsampling leaves too little ({str(exc).splitlines()[0][:120]})"


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
