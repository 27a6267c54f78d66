"""Feature cache: when only the head trains, run the frozen backbone once, not every epoch.

In a frozen-backbone recipe (`resnet_frozen`, `vgg_transfer`) every epoch pushes the same
images through the same frozen network to train a layer of a few thousand parameters:
nearly all the compute is spent recomputing numbers that cannot change. So we split the
network at a *cut point* (the backbone's `cache_cut`, e.g. ResNet's `fc`):

    image --[ frozen prefix, eval mode ]--> feature vector --[ tail: trains ]--> logits
              computed once, stored                          the loop trains this

and hand the loop the tail as `net` and DataLoaders of stored features instead of images.
The loop itself does not change (tl/loop.py is still the only training loop).

When is that exact? The prefix must be a fixed function during training: no trainable
parameter in it, and in the loop's train-mode setup (`net.train()`, frozen BatchNorm back
in eval mode when the recipe says so) it must compute exactly what it computes in eval
mode and change none of its buffers. That is not decided from a list of module types
(Dropout, Dropout2d, StochasticDepth, DropPath, BatchNorm in train mode, and whatever
module comes next): `check_prefix_is_fixed` *tries it* on a few images, and caches only if
the outputs agree bit for bit and every buffer stays as it was. Dropout *after* the cut
keeps working as in training, which is why VGG16 cuts before `classifier.2` (a Dropout)
rather than at `classifier.6`. Then:

* val features are always exact (the val transform is deterministic);
* train features are exact when augmentation is off (`--no-augment`);
* with augmentation, `--cache-views K` precomputes K random crops/flips per image and
  each epoch draws one of them per image: an approximation, said as such in the results.

The one-time pass runs a copy of the network with each frozen BatchNorm folded into the
convolution before it (`fold_batchnorm`), in small batches and in the loop's memory layout:
it is the only backbone work a cached run does, so it is worth making cheap.

Caches are stored (float32 by default) under `$TL_CACHE_DIR` (default
`~/.cache/tl-reference/features`), keyed on everything the stored numbers depend on and
nothing else (`cache_key`): change any of it and the cache is rebuilt. A stored file is
checked when read (shape, row count, labels, a SHA-256 of its contents); a damaged one is
reported in one line and rebuilt, never used.

A cache larger than `--cache-limit-gb` is not held in memory: it *spills to disk*. The pass
writes into a memory-mapped file, and the loop reads the cache file memory-mapped
(`torch.load(mmap=True)`), so the OS pages it in and out as its file cache
(`cached_features` explains why that is exact and stays within the limit). Only when the
disk has too little room for it does the run train uncached.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tl.engine.checkpoint import atomic_save, remove_stale_temporaries, state_digest, temporary_beside
from tl.models import BATCHNORM, Backbone


class _Stop(Exception):
    """Raised by the hook once the cut point's input is captured: the rest is not run."""


@dataclass
class CacheSplit:
    tail: nn.Module  # the part that trains, sharing its parameters with the full model
    cut: str  # the dotted name of the first module of the tail

    @property
    def feature_dim(self) -> int:
        """Size of one stored feature vector: the input of the tail's first Linear layer
        (Dropout before it keeps the size)."""
        return next(m.in_features for m in self.tail.modules() if isinstance(m, nn.Linear))


def split_at_cut(model: nn.Module, spec: Backbone) -> CacheSplit:
    """The tail of `model` from `spec.cache_cut` on. "fc" -> model.fc; "classifier.2" ->
    Sequential(classifier[2], ..., classifier[-1]): the same module objects, so training the
    tail trains the model."""
    from tl.models import StackedHead

    if isinstance(model, StackedHead):  # 004 §3: only the stacked Linear(1000, 1) trains
        return CacheSplit(model.dense, "dense")
    parent_name, _, last = spec.cache_cut.rpartition(".")
    if last.isdigit():
        parent = model.get_submodule(parent_name)
        return CacheSplit(nn.Sequential(*list(parent)[int(last):]), spec.cache_cut)
    return CacheSplit(model.get_submodule(spec.cache_cut), spec.cache_cut)


def why_not_cacheable(model: nn.Module, split: CacheSplit, frozen_bn_eval: bool, probe: torch.Tensor) -> str | None:
    """None if the prefix is a fixed function during training, else the reason it is not.

    Two conditions, both checked rather than assumed from module types:
    1. no parameter before the cut trains;
    2. `check_prefix_is_fixed` on `probe` (a few val images): in the loop's train mode
       the prefix gives eval mode's output, twice, and leaves its buffers alone."""
    tail_params = {id(p) for p in split.tail.parameters()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in tail_params]
    if trainable:
        return f"parameters before the cut point {split.cut} train (e.g. {trainable[0]})"
    return check_prefix_is_fixed(model, split, frozen_bn_eval, probe)


@torch.no_grad()
def _prefix_output(model: nn.Module, cut: str, images: torch.Tensor) -> torch.Tensor:
    """The input of the module `cut` for `images` (the forward pass stops there)."""
    captured = []

    def hook(module, inputs):
        captured.append(inputs[0].detach().clone())
        raise _Stop

    handle = model.get_submodule(cut).register_forward_pre_hook(hook)
    try:
        model(images)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured[0]


def check_prefix_is_fixed(model: nn.Module, split: CacheSplit, frozen_bn_eval: bool,
                          probe: torch.Tensor) -> str | None:
    """Run the prefix on `probe` as the loop would train it and compare with eval mode.

    The loop's train setup is `model.train()` and, with `frozen_bn_eval`, every frozen
    BatchNorm back in eval mode (tl/loop.py). Two passes in that setup, with different
    random seeds, must both equal the eval-mode pass bit for bit: a Dropout, a stochastic
    depth or a BatchNorm normalising with batch statistics breaks that. A BatchNorm in
    train mode also updates its running statistics, which the buffer comparison sees. The
    model's buffers, mode and the global RNG are restored afterwards, whatever happens."""
    from tl.models import frozen_batchnorm_modules

    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[]):
            model.eval()
            reference = _prefix_output(model, split.cut, probe)
            passes = []
            for seed in (1, 2):
                torch.manual_seed(seed)
                model.train()
                if frozen_bn_eval:
                    for bn in frozen_batchnorm_modules(model):
                        bn.eval()
                passes.append(_prefix_output(model, split.cut, probe))
        changed = [n for n, b in model.named_buffers() if not torch.equal(b, buffers[n])]
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        model.train(was_training)
    if changed:
        return f"{changed[0]} changes in training (a BatchNorm in train mode updates its statistics)"
    if not all(torch.equal(p, reference) for p in passes):
        return (f"the layers before {split.cut} compute something else in training than in evaluation "
                f"(Dropout, stochastic depth or BatchNorm batch statistics)")
    return None


def feature_batch_size(device: torch.device | str) -> int:
    """Images per forward pass of the one-time feature pass. On a GPU, large batches fill the
    device. On this 2-core CPU, small ones win: EfficientNet-Lite0 inference ran at 124 img/s
    with batches of 8 and 91 img/s with 32, because a batch's activations (32 x 32 x 112 x 112
    floats after the stem alone) no longer fit the CPU caches (measured with channels_last)."""
    return 64 if torch.device(device).type == "cuda" else 8


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


@torch.no_grad()
def compute_features(model: nn.Module, cut: str, dataset: Dataset, *, views: int = 1, batch_size: int | None = None,
                     device: torch.device | str = "cpu", seed: int = 0, workers: int = 0,
                     channels_last: bool = False, dtype: torch.dtype = torch.float32,
                     store: Path | None = None) -> torch.Tensor:
    """(views, N, D) inputs of the module `cut`, for every image of `dataset` in order, as `dtype`.

    The full model runs in eval mode; a forward pre-hook on `cut` stores its input and
    stops the forward pass there. With a random (train) transform, each view is a new draw.
    `channels_last` runs the pass in the NHWC layout the loop would use (faster on CPU too).
    With `store` (a file), the result lives in that file, memory-mapped (`torch.from_file`,
    shared: every write goes to the file), not in the process's memory: how a cache larger
    than `--cache-limit-gb` is computed. The numbers are the same either way.
    """
    batch_size = batch_size or feature_batch_size(device)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    captured: list[torch.Tensor] = []

    def hook(module, inputs):
        captured.append(inputs[0].flatten(1).float().cpu())  # (B, D)
        raise _Stop

    handle = model.get_submodule(cut).register_forward_pre_hook(hook)
    was_training = model.training
    model.eval().to(device, memory_format=layout)
    generator = torch.Generator().manual_seed(seed)
    # filled batch by batch, allocated once the first batch gives D: the pass holds the cache's
    # size once (a list of batches joined by cat, then stacked, would hold it three times)
    out: torch.Tensor | None = None
    # fork_rng: the random crops drawn here depend on `seed` alone and leave the run's own
    # RNG untouched, so a run that finds the cache on disk continues exactly like one that built it
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            for view in range(views):
                loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                    generator=generator)
                row = 0
                for inputs, _labels in loader:
                    try:
                        model(inputs.to(device).contiguous(memory_format=layout))
                    except _Stop:
                        pass
                    batch = captured.pop()  # (B, D)
                    if out is None:
                        shape = (views, len(dataset), batch.shape[1])
                        out = (torch.empty(shape, dtype=dtype) if store is None else
                               torch.from_file(str(store), shared=True, size=math.prod(shape), dtype=dtype).view(shape))
                    out[view, row:row + len(batch)] = batch
                    row += len(batch)
        finally:
            handle.remove()
            model.train(was_training)
    return out  # (views, N, D)


class FeatureSet(Dataset):
    """Stored features (views, N, D) and their labels; each access draws one of the views
    with torch's global RNG (so the draw is seeded and restored on resume like any other).
    `on_disk` is the cache file when `features` is memory-mapped from it rather than in memory."""

    def __init__(self, features: torch.Tensor, targets: torch.Tensor, on_disk: Path | None = None):
        self.features, self.targets, self.on_disk = features, targets, on_disk

    def __len__(self) -> int:
        return self.features.shape[1]

    def __getitem__(self, i: int):
        v = int(torch.randint(self.features.shape[0], ())) if self.features.shape[0] > 1 else 0
        return self.features[v, i].float(), int(self.targets[i])


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


def cache_key(digest: str, dataset, *, views: int, random_views: bool, seed: int, workers: int, dtype: torch.dtype,
              device, channels_last: bool, folded: bool) -> str:
    """A hash of everything the stored features of `dataset` depend on, and nothing else:

    the prefix (`prefix_digest`), how the pass ran (device type, memory layout, batch size,
    BatchNorm folding, storage dtype: each changes the float rounding), the library versions
    (decoders, resampling, kernels), the transform, and each file with its label, size and
    modification time. The seed and the worker count decide which random crops are drawn
    (each worker seeds its own RNG), so they enter the key only for random views: without
    augmentation every seed reuses the same features."""
    files = [(p, t, os.path.getsize(p), os.stat(p).st_mtime_ns) for p, t in dataset.samples]
    settings = {"prefix": digest, "transform": repr(dataset.transform), "files": files, "views": views,
                "dtype": str(dtype), "device": torch.device(device).type, "channels_last": channels_last,
                "batch_size": feature_batch_size(device), "folded": folded, "versions": _library_versions()}
    if random_views:
        settings |= {"seed": seed, "workers": workers}
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


def cached_features(model: nn.Module, split: CacheSplit, dataset, *, key: str, views: int, seed: int, device,
                    dtype: torch.dtype = torch.float32, limit_gb: float = 2.0, workers: int = 0,
                    channels_last: bool = False, phase: str = "", log=print) -> FeatureSet | None:
    """Load the features of `dataset` from the cache, or compute and store them.

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
    needed = views * len(dataset) * split.feature_dim * torch.tensor([], dtype=dtype).element_size()
    spill = needed > limit_gb * 2**30
    spilled = (f"feature cache for {phase or 'a data set'}: {_gb(needed)} > --cache-limit-gb {limit_gb}: "
               f"kept on disk (memory-mapped) at {path}")
    if path.is_file():
        found, why = _read_cache(path, views, len(dataset), split.feature_dim, targets, mmap=spill)
        if found is not None:
            if spill:
                log(spilled)
            return found
        log(f"feature cache file {path} is damaged ({why}): rebuilding it")
    run = dict(views=views, seed=seed, device=device, workers=workers, channels_last=channels_last, dtype=dtype)
    if not spill:
        features = compute_features(model, split.cut, dataset, **run)
        atomic_save({"features": features, "targets": targets, "checksum": _checksum(features, targets)}, path)
        return FeatureSet(features, targets)
    path.parent.mkdir(parents=True, exist_ok=True)

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
        features = compute_features(model, split.cut, dataset, store=raw, **run)
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


class FeaturesOrImages(nn.Module):
    """The `net` handed to the loop when some phase is cached: stored feature vectors (B, D)
    go through the tail only, images (B, 3, H, W) through the whole model. Both paths use
    the same parameters, so a phase may be cached while the other is not (e.g. val cached,
    augmented train images not)."""

    def __init__(self, model: nn.Module, tail: nn.Module):
        super().__init__()
        self.model, self.tail = model, tail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(x) if x.dim() == 2 else self.model(x)

    def state_dict(self, *args, **kwargs):
        """The model's own state_dict (the tail's tensors are the model's): the loop's copy of
        the best epoch then loads straight into the model and goes to best.pth as it is."""
        return self.model.state_dict(*args, **kwargs)


def plan_cache(model: nn.Module, spec: Backbone, sets: dict, *, frozen_bn_eval: bool, augment: bool, views: int,
               seed: int, device, dtype: torch.dtype, limit_gb: float, workers: int, channels_last: bool = False,
               log=print) -> tuple[nn.Module, dict, str]:
    """Decide what to cache and build it: (net for the loop, {phase: FeatureSet}, mode string).

    `model` must already hold the weights it will train from (a resumed run loads its
    checkpoint first): the cache is computed from, and keyed on, exactly those weights.
    The mode string is what the run's config and the results table record."""
    split = split_at_cut(model, spec)
    if cache_dir().is_dir():
        remove_stale_temporaries(cache_dir())  # once per run: left by a run killed while it stored features
    val = sets["val"]
    probe = torch.stack([val[i][0] for i in range(min(4, len(val)))])  # deterministic val images
    probe = probe.to(next(model.parameters()).device)
    reason = why_not_cacheable(model, split, frozen_bn_eval, probe)
    if reason is not None:
        return model, {}, f"off ({reason})"
    # the feature pass runs a copy with its BatchNorms folded into the convolutions (exact
    # while they are frozen in eval mode); the model that trains is not touched
    extractor = fold_batchnorm(model)
    folded = extractor is not model
    digest = prefix_digest(model, split)
    common = dict(seed=seed, device=device, dtype=dtype, limit_gb=limit_gb, workers=workers,
                  channels_last=channels_last, log=log)

    def phase_cache(phase: str, ds, n_views: int, random_views: bool) -> FeatureSet | None:
        key = cache_key(digest, ds, views=n_views, random_views=random_views, seed=seed, workers=workers, dtype=dtype,
                        device=device, channels_last=channels_last, folded=folded)
        return cached_features(extractor, split, ds, key=key, views=n_views, phase=phase, **common)

    cached = {"val": phase_cache("val", val, 1, False)}
    if not augment:
        cached["train"] = phase_cache("train", sets["train"], 1, False)
    elif views > 0:
        cached["train"] = phase_cache("train", sets["train"], views, True)
    refused = [phase for phase, fs in cached.items() if fs is None]  # over the limit, too little disk to spill
    cached = {phase: fs for phase, fs in cached.items() if fs is not None}
    if not cached:
        return model, {}, "off (over --cache-limit-gb, too little free disk to keep it on disk)"
    if "train" not in cached:
        mode = "val only (" + ("train: too little free disk" if "train" in refused
                               else "train images are augmented") + ")"
    else:
        how = "exact: no augmentation" if not augment else f"train: {views} precomputed augmented views per image"
        mode = f"train + val ({how})" if "val" in cached else f"train only ({how}, val: too little free disk)"
    on_disk = [phase for phase, fs in cached.items() if fs.on_disk is not None]
    if on_disk:
        mode += f" (on disk, memory-mapped: {', '.join(on_disk)})"
    return FeaturesOrImages(model, split.tail), cached, mode
