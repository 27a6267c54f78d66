"""RunOptions: everything about a run that is not the recipe's own numbers (the command
line's options, declared here once: main.py's argparse names are these field names)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from tl.recipe import Recipe


@dataclass
class RunOptions:
    """Everything about a run that is not the recipe's own numbers (the command line's options)."""

    data: Path
    backbone: str | None = None  # None: the recipe's own
    weights: str | None = None  # None: the recipe's own; "imagenet", "none" or a file path
    epochs: int | None = None  # training epochs; None: the recipe's own
    batch_size: int | None = None
    lr_scale: float = 1.0  # multiplies every learning rate of the recipe
    device: str = "auto"
    seed: int = 0
    workers: int = 2
    out: Path = Path("runs")
    run_name: str | None = None  # folder name inside `out`; default <experiment>-<backbone>-<time>
    image_size: int | None = None  # crop size; None: the backbone's own (224 for most); val resizes by 256/224
    max_per_class: int | None = None  # use only the first N images of each class (smoke runs)
    train_per_class: int | None = None  # train on a seeded draw of N images per class (split_seed; val untouched)
    train_fraction: dict[str, float] | None = None  # keep a seeded fraction of these classes' train images
    val_split: float | None = None  # split a folder of class folders into train/val (seeded, per class)
    split_seed: int = 0  # seed of that split alone: a training --seed must not change the val images
    verify_images: bool = False  # fully decode every image before training (finds truncated files)
    follow_links: bool = False  # include files reached through links that leave the data folder
    inner_val: float | None = None  # tuning: score on this fraction of train/ (per class); val/ and test/ unread
    folds: int | None = None  # tuning: K folds of train/ instead, inner val = fold `inner_fold`
    inner_fold: int = 0
    augment: bool = True
    save_every_epoch: bool = False
    amp: bool = True  # mixed precision, only ever used on CUDA
    channels_last: bool | None = None  # NHWC memory layout; None: by measurement, on for a CPU, off for CUDA
    feature_cache: bool = True  # cache what a frozen prefix computes (tl/features.py) where that is exact
    cache_views: int = 0  # with augmentation: K precomputed augmented views per train image (0: train uncached)
    cache_limit_gb: float = 2.0  # memory for a cache: a larger feature cache stays on disk (mmap), no image cache
    image_cache: bool = False  # decode and resize every image once, keep uint8 tensors in memory
    device_images: bool = False  # with image_cache: those tensors live on the training device, augmented there
    compile: bool = False  # torch.compile the network the loop trains (checkpoints keep the plain module's names)
    patience: int | None = None  # early stopping (004 §2.3): stop after this many epochs without a new best
    monitor: str = "acc"  # what "best" means for best.pth and early stopping: val "acc" or val "loss"
    informative_names: bool = False  # per-epoch files named epoch03-loss0.1820-acc0.9412.pth (004)
    plots: bool = True  # learning curves, confusion matrix and prediction grid in the run folder
    allow_pickle: bool = False  # --weights may be a whole pickled model (runs code from the file)
    progress: bool = True
    sync_bn: bool = False  # under torchrun on GPUs: BatchNorm statistics over all processes' batches (SyncBatchNorm)
    class_weights: str | None = None  # "auto": weigh each class's loss by its inverse frequency in train
    balanced_sampler: bool = False  # draw train images with replacement, every class equally often
    tensorboard: bool = False  # event files in RUN/tensorboard/: loss and accuracy per epoch, rates per step
    ema: float | None = None  # decay of an average of the weights (tl/engine/ema.py); None: the recipe's own
    tta: bool | None = None  # score and predict with the photo and its mirror averaged; None: the recipe's own


    def __post_init__(self) -> None:
        if self.device_images:
            # images on the device are transformed in the main process: no worker processes,
            # for the loop and for the feature pass alike (and config.json records that)
            self.image_cache, self.workers = True, 0

    def make_quick(self) -> None:
        """`--quick`: a smoke run of seconds, 8 images per class, 64-pixel crops, 1 training epoch."""
        self.max_per_class, self.image_size, self.workers = 8, 64, 0
        self.epochs = self.epochs or 1


def resolve(recipe: Recipe, opts: RunOptions) -> Recipe:
    """The recipe with the command line's overrides applied (`--epochs`, `--lr-scale`, ...)."""
    changes: dict = {"lrs": {g: lr * opts.lr_scale for g, lr in recipe.lrs.items()}}
    if recipe.first_lrs is not None:
        changes["first_lrs"] = {g: lr * opts.lr_scale for g, lr in recipe.first_lrs.items()}
    if opts.backbone:
        changes["backbone"] = opts.backbone
    if opts.weights:
        changes["weights"] = opts.weights
    if opts.epochs is not None:
        changes["train_epochs"] = opts.epochs
    if opts.batch_size is not None:
        changes["batch_size"] = opts.batch_size
    if opts.ema is not None:
        changes["ema_decay"] = opts.ema
    if opts.tta is not None:
        changes["tta"] = opts.tta
    return dataclasses.replace(recipe, **changes)


def as_saved(value):
    return str(value) if isinstance(value, Path) else value
