"""The feature store: where the frozen-feature idea (tl/features.py) keeps what it computed.

A cached run computes its frozen prefix's features once and stores them under
`$TL_CACHE_DIR` (default `~/.cache/tl-reference/features`), keyed on everything the
stored numbers depend on and nothing else (`cache_key`): change any of it and the cache
is rebuilt. A stored file is checked when read (shape, row count, labels, a SHA-256 of
its contents); a damaged one is reported in one line and rebuilt, never used.

A cache larger than `--cache-limit-gb` is not held in memory: it *spills to disk*. The pass
writes into a memory-mapped file, and the loop reads the cache file memory-mapped
(`torch.load(mmap=True)`), so the OS pages it in and out as its file cache
(`cached_features` explains why that is exact and stays within the limit). Only when the
disk has too little room for it does the run train uncached.

`plan_cache` decides, per phase, what a stage trains on, and returns a `CachePlan`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tl.engine import folders
from tl.engine.bn_folding import fold_batchnorm
from tl.engine.files import atomic_save, remove_stale_temporaries, state_digest, temporary_beside
from tl.engine.images import READER
from tl.engine.progress import progress
from tl.features import (
    CacheSplit,
    FeatureSet,
    FeaturesOrImages,
    forward_to,
    split_at_cut,
    why_not_cacheable,
)
from tl.models import Backbone


def feature_batch_size(device: torch.device | str) -> int:
    """Images per forward pass of the one-time feature pass. On a GPU, large batches fill the
    device. On this 2-core CPU, small ones win: the EfficientNet-Lite0 pass (channels_last, JPEG
    decoding included) ran at 97-106 img/s with batches of 4 to 16, 80 with 32 and 68 with 64
    (results/benchmark_feature_batch.md), because a large batch's activations (32 x 32 x 112 x 112
    floats after the stem alone) no longer fit the CPU caches."""
    return 64 if torch.device(device).type == "cuda" else 8


@dataclass(frozen=True)
class FeaturePass:
    """How one feature pass runs: every setting, besides the prefix and the images, that decides
    the stored numbers. `compute_features` runs by it and `cache_key` hashes it, so a setting the
    pass uses cannot be left out of the key (a cache found again would then hold other numbers)."""

    views: int = 1  # features per image: one, or --cache-views random crops
    random_views: bool = False  # the transform draws at random: the seed and the workers choose the draws
    seed: int = 0
    workers: int = 0  # DataLoader workers: each seeds its own RNG
    device: torch.device | str = "cpu"
    channels_last: bool = False  # the NHWC layout the loop would use (faster on CPU too)
    dtype: torch.dtype = torch.float32  # how the features are stored
    folded: bool = False  # the model passed is the copy with BatchNorm folded into the convolutions
    batch_size: int | None = None  # images per forward pass; None: `feature_batch_size(device)`

    @property
    def batch(self) -> int:
        return self.batch_size or feature_batch_size(self.device)


@torch.no_grad()
def compute_features(model: nn.Module, cut: str, dataset: Dataset, how: FeaturePass,
                     store: Path | None = None) -> torch.Tensor:
    """(views, N, D) inputs of the module `cut`, for every image of `dataset` in order, as `how.dtype`.

    The full model runs in eval mode, up to `cut` only (`tl.features.forward_to`). With a
    random (train) transform, each view is a new draw.
    With `store` (a file), the result lives in that file, memory-mapped (`torch.from_file`,
    shared: every write goes to the file), not in the process's memory: how a cache larger
    than `--cache-limit-gb` is computed. The numbers are the same either way.
    """
    views, device, dtype = how.views, how.device, how.dtype
    layout = torch.channels_last if how.channels_last else torch.contiguous_format
    was_training = model.training
    model.eval().to(device, memory_format=layout)
    generator = torch.Generator().manual_seed(how.seed)
    # filled batch by batch, allocated once the first batch gives D: the pass holds the cache's
    # size once (a list of batches joined by cat, then stacked, would hold it three times)
    out: torch.Tensor | None = None
    # fork_rng: the random crops drawn here depend on `seed` alone and leave the run's own
    # RNG untouched, so a run that finds the cache on disk continues exactly like one that built it
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(how.seed)
        try:
            for view in range(views):
                loader = DataLoader(dataset, batch_size=how.batch, shuffle=False, num_workers=how.workers,
                                    generator=generator)
                row = 0
                desc = f"features of {getattr(dataset, 'root', f'{len(dataset)} images')}" + (
                    f", view {view + 1}/{views}" if views > 1 else "")
                for inputs, _labels in progress(loader, desc, unit=" batches"):
                    batch = forward_to(model, cut, inputs.to(device).contiguous(memory_format=layout))
                    batch = batch.flatten(1).float().cpu()  # (B, D)
                    if out is None:
                        shape = (views, len(dataset), batch.shape[1])
                        out = (torch.empty(shape, dtype=dtype) if store is None else
                               torch.from_file(str(store), shared=True, size=math.prod(shape), dtype=dtype).view(shape))
                    out[view, row:row + len(batch)] = batch
                    row += len(batch)
        finally:
            model.train(was_training)
    return out  # (views, N, D)


def cache_dir() -> Path:
    return Path(os.environ.get("TL_CACHE_DIR", Path.home() / ".cache" / "tl-reference" / "features"))


def prefix_digest(model: nn.Module, split: CacheSplit) -> str:
    """A hash of the frozen prefix: each module's type and settings (`extra_repr`: kernel
    sizes, strides, BatchNorm's eps, ...), and its weights and BatchNorm statistics.
    The tail (what trains) is left out: a new head does not change the features."""
    h = hashlib.sha256(f"{type(model).__name__}:{split.cut}".encode())
    tail_modules = {id(m) for m in split.tail.modules()}
    for name, module in model.named_modules():
        if id(module) not in tail_modules:
            h.update(f"{name}:{type(module).__module__}.{type(module).__qualname__}({module.extra_repr()})".encode())
    tail = {id(p) for p in split.tail.parameters()} | {id(b) for b in split.tail.buffers()}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in tail:
            h.update(name.encode())
            h.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _library_versions() -> dict:
    import PIL
    import torchvision

    versions = {"torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__}
    try:
        import timm

        versions["timm"] = timm.__version__
    except ImportError:
        pass
    return versions


def cache_key(digest: str, dataset, how: FeaturePass) -> str:
    """A hash of everything the stored features of `dataset` depend on, and nothing else:

    the prefix (`prefix_digest`), how the pass ran (`how`: the views, device type, memory layout,
    batch size, BatchNorm folding, storage dtype: each changes the float rounding), the library versions
    (decoders, resampling, kernels), how a file becomes pixels (`images.READER`: EXIF orientation
    applied), the transform, and each file with its label, size and modification time. On the
    CPU, the thread count too: a convolution split over another number of threads sums in
    another order. The seed and the worker count decide which random crops are drawn (each
    worker seeds its own RNG), so they enter the key only for random views: without
    augmentation every seed reuses the same features."""
    files = [(p, t, os.path.getsize(p), os.stat(p).st_mtime_ns) for p, t in dataset.samples]
    settings = {"prefix": digest, "transform": repr(dataset.transform), "files": files, "views": how.views,
                "dtype": str(how.dtype), "device": torch.device(how.device).type, "channels_last": how.channels_last,
                "batch_size": how.batch, "folded": how.folded, "versions": _library_versions(),
                "reader": READER}
    if settings["device"] == "cpu":
        settings["threads"] = torch.get_num_threads()
    if how.random_views:
        settings |= {"seed": how.seed, "workers": how.workers}
    return hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:32]


def _checksum(features: torch.Tensor, targets: torch.Tensor) -> str:
    return state_digest({"features": features, "targets": targets})


def _read_cache(path: Path, views: int, n: int, dim: int, targets: torch.Tensor,
                mmap: bool = False) -> tuple[FeatureSet | None, str]:
    """The stored features at `path` if they are intact and fit, else (None, why not).
    With `mmap` the features stay in the file, memory-mapped; the checks are the same
    (the checksum then streams through the file's pages)."""
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        features, stored_targets, checksum = stored["features"], stored["targets"], stored["checksum"]
    except Exception as exc:  # truncated, not a torch file, missing keys: all mean "rebuild"
        return None, f"unreadable ({type(exc).__name__})"
    if tuple(features.shape) != (views, n, dim):
        return None, f"shape {tuple(features.shape)}, expected {(views, n, dim)}"
    if not torch.equal(stored_targets, targets):
        return None, "labels differ from the data set's"
    if _checksum(features, stored_targets) != checksum:
        return None, "contents do not match their checksum"
    return FeatureSet(features, stored_targets, on_disk=path if mmap else None), ""


DISK_MARGIN = 2**28  # bytes left free on the cache's disk beyond what a spilled cache needs (256 MiB)


def _gb(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GB"


def cached_features(model: nn.Module, split: CacheSplit, dataset, how: FeaturePass, *, key: str,
                    limit_gb: float = 2.0, phase: str = "", log=print) -> FeatureSet | None:
    """Load the features of `dataset` from the cache (under `key`, `cache_key`'s hash of `how`
    and the rest), or compute them by `how` and store them.

    Features larger than `limit_gb` *spill to disk*: they are computed into a memory-mapped
    file (`compute_features(store=...)`), saved as the usual cache file, and used memory-mapped
    from it (`torch.load(mmap=True)`); a cache file found on disk is mapped the same way.
    Why that keeps memory within the limit: mapped pages are the OS's file cache, read from
    disk when the loop touches them. They are clean copies of the file, so whenever memory is
    short the kernel simply drops them (and reads them again if needed), whereas the
    process's own memory would have to be kept or swapped out; the process holds no copy of
    the features. Why it is exact: the loop reads the very bytes an in-memory cache would
    hold (the same pass computed them, the same file stores them), so training is
    bit-identical. `key` does not depend on the limit: a spilled file and an in-memory one
    are the same cache entry, and either run reuses the other's.

    Returns None (the caller then trains uncached) only when spilling is needed and the cache's
    disk has too little free space: the raw file being filled and the saved cache file exist
    side by side for a moment (twice the size), plus `DISK_MARGIN`."""
    path = cache_dir() / f"{key}.pt"
    targets = torch.tensor(dataset.targets)
    needed = how.views * len(dataset) * split.feature_dim * torch.tensor([], dtype=how.dtype).element_size()
    spill = needed > limit_gb * 2**30
    spilled = (f"feature cache for {phase or 'a data set'}: {_gb(needed)} > --cache-limit-gb {limit_gb}: "
               f"kept on disk (memory-mapped) at {path}")
    if path.is_file():
        found, why = _read_cache(path, how.views, len(dataset), split.feature_dim, targets, mmap=spill)
        if found is not None:
            if spill:
                log(spilled)
            return found
        log(f"feature cache file {path} is damaged ({why}): rebuilding it")
    if not spill:
        features = compute_features(model, split.cut, dataset, how)
        atomic_save({"features": features, "targets": targets, "checksum": _checksum(features, targets)}, path)
        return FeatureSet(features, targets)
    folders.make(path.parent)

    def no_room(free: int) -> str:
        return (f"feature cache for {phase or 'a data set'} would need {_gb(needed)} > --cache-limit-gb {limit_gb}, "
                f"and {path.parent} has {_gb(free)} free, too little to keep it on disk "
                f"({_gb(2 * needed + DISK_MARGIN)} while it is written): running uncached")

    free = shutil.disk_usage(path.parent).free
    if free < 2 * needed + DISK_MARGIN:
        log(no_room(free))
        return None
    # the raw (views, N, D) array is filled through a shared mapping of a temporary file
    # (`.KEY.raw.PID.XXXXXXXX.tmp`: a killed run's leftover is swept like any temporary)
    fd, raw = temporary_beside(path.with_suffix(".raw"))
    try:
        try:
            if hasattr(os, "posix_fallocate"):
                # reserve the blocks now: a disk that fills up meanwhile fails here with ENOSPC,
                # not with a SIGBUS when the kernel writes a mapped page back during the pass
                os.posix_fallocate(fd, 0, needed)
        finally:
            os.close(fd)
        features = compute_features(model, split.cut, dataset, how, store=raw)
        atomic_save({"features": features, "targets": targets, "checksum": _checksum(features, targets)}, path)
        del features  # unmaps the raw file
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):  # disk full, or the user's quota
            raise
        log(no_room(shutil.disk_usage(path.parent).free))  # another writer filled the disk meanwhile
        return None
    finally:
        raw.unlink(missing_ok=True)
    log(spilled)
    return FeatureSet(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["features"], targets,
                      on_disk=path)


@dataclass
class CachePlan:
    """What one stage trains on: `net` for the loop (the model, or `FeaturesOrImages` when some
    phase is cached), the stored features per phase, and the decision in words (`mode`, which
    config.json and the results table record). Decisions read the fields, never the words."""

    net: nn.Module
    cached: dict = field(default_factory=dict)  # phase -> FeatureSet
    why_off: str | None = None  # why nothing is cached ("" when the cache was not asked for); None: cached
    on_disk: tuple[str, ...] = ()  # phases whose cache spilled to disk (memory-mapped)
    description: str = ""  # what is cached and why, e.g. "train + val (exact: no augmentation)"
    recorded_as: str = ""  # a resumed stage keeps the words its first part recorded

    @property
    def off(self) -> bool:
        return self.why_off is not None

    @property
    def kind(self) -> str:
        """The decision without where the cache lies: in memory or on disk, the numbers are the same."""
        if self.recorded_as:
            return self.recorded_as.split(" (on disk")[0]
        if self.off:
            return f"off ({self.why_off})" if self.why_off else "off"
        return self.description

    @property
    def mode(self) -> str:
        if self.recorded_as:
            return self.recorded_as
        return self.kind + (f" (on disk, memory-mapped: {', '.join(self.on_disk)})" if self.on_disk else "")

    @classmethod
    def recorded(cls, model: nn.Module, mode: str) -> CachePlan:
        """The plan a checkpoint's config recorded in words, as far as a resumed run needs it (uncached
        or not, and of which kind): the one place those words are read back."""
        kind = mode.split(" (on disk")[0]  # the words `mode` writes, read back
        if kind == "off" or kind.startswith("off ("):
            return cls(model, why_off=kind[len("off ("):-1], recorded_as=mode)
        return cls(model, description=kind, recorded_as=mode)


def plan_cache(model: nn.Module, spec: Backbone, sets: dict, how: FeaturePass, *, frozen_bn_eval: bool,
               augment: bool, views: int, limit_gb: float, bn_eval: bool = False, log=print) -> CachePlan:
    """Decide what to cache and build it (see `CachePlan`). `frozen_bn_eval` and `bn_eval` are
    the loop's: the features are exact only if the prefix computes with them what it computes in eval mode.
    `how` is the pass's seed, workers, device, layout and dtype; each phase's pass is `how` with
    its own views (`views` random crops for augmented train images, else one).

    `model` must already hold the weights it will train from (a resumed run loads its
    checkpoint first): the cache is computed from, and keyed on, exactly those weights.
    The mode string is what the run's config and the results table record."""
    split = split_at_cut(model, spec)
    if cache_dir().is_dir():
        remove_stale_temporaries(cache_dir())  # once per run: left by a run killed while it stored features
    val = sets["val"]
    probe = torch.stack([val[i][0] for i in range(min(4, len(val)))])  # deterministic val images
    probe = probe.to(next(model.parameters()).device)
    reason = why_not_cacheable(model, split, frozen_bn_eval, probe, bn_eval)
    if reason is not None:
        return CachePlan(model, why_off=reason)
    # the feature pass runs a copy with its BatchNorms folded into the convolutions (exact
    # while they are frozen in eval mode); the model that trains is not touched
    extractor = fold_batchnorm(model)
    folded = extractor is not model
    digest = prefix_digest(model, split)

    def phase_cache(phase: str, ds, n_views: int, random_views: bool) -> FeatureSet | None:
        run = replace(how, views=n_views, random_views=random_views, folded=folded)
        return cached_features(extractor, split, ds, run, key=cache_key(digest, ds, run), limit_gb=limit_gb,
                               phase=phase, log=log)

    cached = {"val": phase_cache("val", val, 1, False)}
    if not augment:
        cached["train"] = phase_cache("train", sets["train"], 1, False)
    elif views > 0:
        cached["train"] = phase_cache("train", sets["train"], views, True)
    refused = [phase for phase, fs in cached.items() if fs is None]  # over the limit, too little disk to spill
    cached = {phase: fs for phase, fs in cached.items() if fs is not None}
    if not cached:
        return CachePlan(model, why_off="over --cache-limit-gb, too little free disk to keep it on disk")
    if "train" not in cached:
        mode = "val only (" + ("train: too little free disk" if "train" in refused
                               else "train images are augmented") + ")"
    else:
        detail = "exact: no augmentation" if not augment else f"train: {views} precomputed augmented views per image"
        mode = f"train + val ({detail})" if "val" in cached else f"train only ({detail}, val: too little free disk)"
    on_disk = tuple(phase for phase, fs in cached.items() if fs.on_disk is not None)
    return CachePlan(FeaturesOrImages(model, split.tail), cached, on_disk=on_disk, description=mode)
