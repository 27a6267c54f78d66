"""Images on disk -> normalised tensors -> the phase-dict of DataLoaders.

Every source document builds the same three things (002 §1.3 steps 2-3, 003 §1):
a transform per phase, a Dataset per phase, and a dict ``{"train": loader,
"val": loader}`` that the loop walks phase by phase. The data sets come from a folder
laid out the way ``torchvision.datasets.ImageFolder`` expects::

    DATA/train/<class>/*.jpg     DATA/val/<class>/*.jpg     [DATA/test/<class>/*.jpg]

The class names (and so the number of outputs of the new head) come from the folder
names; nothing here assumes two classes. Which files of such a folder are usable
images, and which of them a run uses, is the machinery's job (`tl.engine.selection`:
one function decides it for training, evaluation and every study); this module turns
those data sets into what the loop eats.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, WeightedRandomSampler
from torchvision.transforms import v2


def val_resize(size: int) -> int:
    """The shorter side the val transform resizes to before cropping `size`: 256 for 224."""
    return round(size * 256 / 224)


AUGMENT_POLICIES = ("standard", "tutorial", "strong")  # the train augmentations build_transforms knows


def build_transforms(
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    size: int = 224,
    resize: int | None = None,
    augment: bool = True,
    policy: str = "standard",
) -> dict[str, v2.Compose]:
    """The two pipelines of document 002 §1.3 (`ImageTransform`), with torchvision v2.

    train: a random crop covering 50-100% of the image, resized to `size`, and a coin-flip
           mirror: each epoch sees a slightly different picture, which is how 244 photos
           can train a network without being memorised at once.
    val:   deterministic. Resize the *shorter side* to `resize` (256), then cut the central
           `size` (224) square. The order matters: 003 crops first and resizes after,
           which yields 256-pixel images and throws away most of each photo (docs/ERRATA.md).
    test:  the val pipeline: a headline is never scored on random crops.

    `mean`/`std` must be the ones the backbone's weights were trained with (ImageNet
    statistics for torchvision, 0.5 for the packaged EfficientNet-Lite0): the first
    convolution expects inputs on that scale. `augment=False` gives the train phase
    the val pipeline, which makes the train features deterministic (and cacheable).
    `resize` defaults to torchvision's ImageNet ratio, 256 for a 224 crop (73 for the 64-pixel
    smoke runs); 002 itself resizes the shorter side to 224 and crops 224, keeping all of it.

    `policy` picks the train augmentation a recipe asks for:
      "standard"  the crop of 50-100% above (002's `scale=(0.5, 1.0)`);
      "tutorial"  torchvision's default crop of 8-100% of the image, as the PyTorch
                  transfer-learning tutorial uses it (`RandomResizedCrop(224)`);
      "strong"    that 8-100% crop, the flip, and TrivialAugmentWide (Müller & Hutter 2021:
                  one random photometric or geometric operation of random strength per
                  image), the augmentation of torchvision's current training recipes.
    """
    if policy not in AUGMENT_POLICIES:
        raise ValueError(f"unknown augmentation policy {policy!r}")
    resize = resize if resize is not None else val_resize(size)
    to_float = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]  # uint8 -> [0,1] -> z-scores
    val = v2.Compose([v2.ToImage(), v2.Resize(resize, antialias=True), v2.CenterCrop(size), *to_float])
    if not augment:
        return {"train": val, "val": val, "test": val}
    scale = (0.5, 1.0) if policy == "standard" else (0.08, 1.0)  # fraction of the image area a crop covers
    train = v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(size, scale=scale, antialias=True),
        v2.RandomHorizontalFlip(),
        *([v2.TrivialAugmentWide()] if policy == "strong" else []),  # on uint8 pixels, before scaling
        *to_float,
    ])
    return {"train": train, "val": val, "test": val}


def _seed_worker(worker_id: int) -> None:
    """Give each loader worker's `random` a seed derived from torch's per-worker seed,
    so augmentation that uses Python's RNG is reproducible too."""
    random.seed(torch.initial_seed() % 2**32)


def make_loaders(
    sets: dict[str, torch.utils.data.Dataset],
    batch_size: int,
    *,
    seed: int = 0,
    workers: int = 0,
    pin_memory: bool = False,
    generator: torch.Generator | None = None,
    sample_weights: torch.Tensor | None = None,
    shard: Callable | None = None,
) -> dict[str, DataLoader]:
    """The phase-dict of DataLoaders that the loop walks (002 §1.3 step 3).

    Only train is shuffled. Its order comes from a `torch.Generator` (`generator`, or a new
    one seeded with `seed`; `loaders["train"].generator`): the checkpoint saves that
    generator's state, which is what lets a resumed run draw exactly the batches an
    uninterrupted run would have.
    Workers are not persistent for the same reason: each epoch's workers are seeded afresh
    from the generator.
    [DDP] Under torchrun each process loads only its shard: `shard(dataset, shuffle=, seed=,
    weights=)` gives this process's sampler (the machinery passes tl/engine/distributed.py's
    `sampler`; train's order then comes from `seed` + epoch, val's shards hold every image once).
    `sample_weights` (one per train image, `--balanced-sampler`): train draws len(train) images
    with replacement, each with that weight (a `WeightedRandomSampler` on the same generator).
    """
    loaders = {}
    for phase, ds in sets.items():
        train = phase == "train"
        weights, order = (sample_weights, generator or torch.Generator().manual_seed(seed)) if train else (None, None)
        # [DDP] under torchrun: this process's shard of the phase; None in one process
        sampler = shard(ds, shuffle=train, seed=seed, weights=weights) if shard is not None else None
        if sampler is None and weights is not None:  # classes drawn as often as their weights say
            sampler = WeightedRandomSampler(weights, len(ds), generator=order)
        loaders[phase] = DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            generator=order,
            num_workers=workers,
            worker_init_fn=_seed_worker if workers else None,
            pin_memory=pin_memory,  # page-locked host memory: faster, asynchronous copies to a GPU
        )
    return loaders
