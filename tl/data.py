"""Images on disk -> normalised tensors -> the phase-dict of DataLoaders.

Documents 002 (§1.3 steps 2-3) and 003 (§1) build the same three things:
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


AUGMENT_POLICIES = ("standard", "tutorial", "strong")  # the policies build_transforms knows


def build_transforms(mean: tuple[float, ...], std: tuple[float, ...], *, size: int = 224,
                     resize: int | None = None, augment: bool = True,
                     policy: str = "standard") -> dict[str, v2.Compose]:
    """The two pipelines of document 002 §1.3 (`ImageTransform`), with torchvision v2.

    train: a random crop, resized to `size`, and a coin-flip mirror: each epoch sees a slightly
           different picture, so 244 photos train without being memorised at once.
    val:   the *shorter side* resized to `resize` (256; 002: 224), then the central `size` (224);
           003 crops first and resizes after, throwing away most of each photo (docs/ERRATA.md).
    test:  the val pipeline: a headline is never scored on random crops.

    `mean`/`std` are those the backbone's weights were trained with: the first convolution
    expects inputs on that scale. `augment=False` gives train the val pipeline (cacheable).
    `policy`, the recipe's train augmentation: "standard" crops 50-100% of the image (002);
    "tutorial" 8-100%, the PyTorch tutorial's `RandomResizedCrop(224)`; "strong" that crop and
    TrivialAugmentWide (Müller & Hutter 2021: one random operation of random strength).
    """
    if policy not in AUGMENT_POLICIES:
        raise ValueError(f"unknown augmentation policy {policy!r}")
    resize = resize if resize is not None else val_resize(size)
    norm = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]  # uint8 -> z-scores
    val = v2.Compose([v2.ToImage(), v2.Resize(resize, antialias=True), v2.CenterCrop(size), *norm])
    if not augment:
        return {"train": val, "val": val, "test": val}
    scale = (0.5, 1.0) if policy == "standard" else (0.08, 1.0)  # the image area a crop covers
    train = v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(size, scale=scale, antialias=True),
        v2.RandomHorizontalFlip(),
        *([v2.TrivialAugmentWide()] if policy == "strong" else []),  # on uint8, before scaling
        *norm,
    ])
    return {"train": train, "val": val, "test": val}


def _seed_worker(worker_id: int) -> None:
    """Give each loader worker's `random` a seed derived from torch's per-worker seed,
    so augmentation that uses Python's RNG is reproducible too."""
    random.seed(torch.initial_seed() % 2**32)


def make_loaders(sets: dict[str, torch.utils.data.Dataset], batch_size: int, *, seed: int = 0,
                 workers: int = 0, pin_memory: bool = False, shard: Callable | None = None,
                 generator: torch.Generator | None = None,
                 sample_weights: torch.Tensor | None = None) -> dict[str, DataLoader]:
    """The phase-dict of DataLoaders that the loop walks (002 §1.3 step 3). Only train is
    shuffled, in an order drawn from `generator` (or a new one seeded with `seed`): the
    checkpoint saves its state, so a resumed run draws the batches an uninterrupted run
    would (and workers, not persistent, are seeded afresh from it each epoch).
    `sample_weights` (one per train image): train draws len(train) images with replacement,
    each with its weight. [DDP] `shard(dataset, shuffle=, seed=, weights=)` gives this
    process's sampler (tl/engine/distributed.py's `sampler`)."""
    loaders = {}
    for phase, ds in sets.items():
        train = phase == "train"
        weights = sample_weights if train else None
        order = (generator or torch.Generator().manual_seed(seed)) if train else None
        # [DDP] under torchrun: this process's shard of the phase; None in one process
        sampler = shard(ds, shuffle=train, seed=seed, weights=weights) if shard else None
        if sampler is None and weights is not None:  # classes drawn as often as their weights say
            sampler = WeightedRandomSampler(weights, len(ds), generator=order)
        loaders[phase] = DataLoader(ds, batch_size=batch_size, shuffle=train and sampler is None,
                                    sampler=sampler, generator=order, num_workers=workers,
                                    worker_init_fn=_seed_worker if workers else None,
                                    pin_memory=pin_memory)  # page-locked: faster copies to a GPU
    return loaders
