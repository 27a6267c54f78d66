"""tl/engine/feature_store.py: the cache key (what changes the stored numbers, and nothing else), a
damaged cache file reported and rebuilt, cached views, and a cache over --cache-limit-gb
spilled to disk: memory-mapped, exact, checked, or uncached when the disk (or a quota) has no
room.

SPILL is a limit every cache of the tiny data set exceeds, so each run that uses it keeps its
features on disk; the same run with the default limit keeps them in memory."""

from __future__ import annotations

import collections
import copy
import os
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from experiments.recipes import resnet_frozen
from tests.conftest import TinyNet
from tests.helpers import frozen_tiny, seeded_tiny_net, without_timings
from tl import features
from tl.data import build_transforms
from tl.engine import feature_store, files, images
from tl.engine.bn_folding import fold_batchnorm
from tl.engine.feature_store import FeaturePass
from tl.engine.images import CheckedImageFolder
from tl.engine.options import RunOptions
from tl.engine.run import run
from tl.engine.selection import image_datasets
from tl.models import get_backbone, set_trainable

SPILL = 1e-9  # GB: every cache of the tiny data set is over it


SPILL = 1e-9  # GB: about one byte


@pytest.fixture(autouse=True)
def own_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TL_CACHE_DIR", str(tmp_path / "feature-cache"))
    return tmp_path / "feature-cache"


def _run(data, out, lines=None, **kw):
    lines = [] if lines is None else lines
    opts = RunOptions(data=data, backbone="tiny", weights="none", epochs=2, workers=0, out=out, image_size=32,
                      progress=False, plots=False, augment=False, lr_scale=20, **kw)
    return run(resnet_frozen.RECIPE, resnet_frozen.build, opts, log=lines.append)


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in rows]


def _assert_same_training(a, b):
    assert _strip(a.history.rows) == _strip(b.history.rows)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for name, tensor in sa.items():
        assert torch.equal(tensor, sb[name]), name


def _no_feature_pass(*args, **kwargs):
    raise AssertionError("the cache on disk should have been reused")


def test_a_spilled_cache_trains_exactly_like_an_in_memory_one(tiny_data, tiny_backbone, tmp_path, monkeypatch):
    spilled_dir, memory_dir = tmp_path / "spilled-cache", tmp_path / "memory-cache"
    monkeypatch.setenv("TL_CACHE_DIR", str(spilled_dir))
    lines = []
    spilled = _run(tiny_data, tmp_path / "a", lines, cache_limit_gb=SPILL)
    monkeypatch.setenv("TL_CACHE_DIR", str(memory_dir))
    memory = _run(tiny_data, tmp_path / "b")

    assert memory.config["feature_cache"] == "train + val (exact: no augmentation)"
    assert spilled.config["feature_cache"] == ("train + val (exact: no augmentation) "
                                               "(on disk, memory-mapped: val, train)")
    said = [line for line in lines if "kept on disk (memory-mapped) at" in line]
    assert len(said) == 2 and all("--cache-limit-gb 1e-09" in line for line in said), lines
    _assert_same_training(spilled, memory)

    # one cache entry, whatever the limit: the same file names (keys) and the same features
    # (and no temporary left behind: the raw file is gone)
    names = sorted(p.name for p in spilled_dir.iterdir())
    assert len(names) == 2 and names == sorted(p.name for p in memory_dir.iterdir())
    for name in names:
        a, b = (torch.load(d / name, weights_only=True) for d in (spilled_dir, memory_dir))
        assert torch.equal(a["features"], b["features"]) and a["checksum"] == b["checksum"]

    # so either run reuses the other's files, with no feature pass
    monkeypatch.setattr(feature_store, "compute_features", _no_feature_pass)
    monkeypatch.setenv("TL_CACHE_DIR", str(spilled_dir))
    _assert_same_training(_run(tiny_data, tmp_path / "c"), memory)
    monkeypatch.setenv("TL_CACHE_DIR", str(memory_dir))
    reused = _run(tiny_data, tmp_path / "d", cache_limit_gb=SPILL)
    assert reused.config["feature_cache"] == spilled.config["feature_cache"]
    _assert_same_training(reused, memory)


def _mapped_file(tensor: torch.Tensor) -> str:
    """What the memory holding `tensor`'s first byte maps, from /proc/self/maps: a file's
    path for a file mapping; "[heap]" or "" (anonymous memory) for ordinary memory."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= address < high:
            return fields[5] if len(fields) == 6 else ""
    raise AssertionError(f"address {address:#x} is in no mapping")


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads Linux's /proc/self/maps")
def test_a_spilled_cache_is_memory_mapped_not_read_into_memory(tiny_data, tiny_backbone, own_cache_dir):
    spec = get_backbone("tiny")
    torch.manual_seed(0)
    net = TinyNet()
    set_trainable(net, spec, ["head"])
    sets = image_datasets(tiny_data, build_transforms(spec.mean, spec.std, size=32, augment=False))

    def plan(limit_gb):
        how = feature_store.FeaturePass(seed=0, device=torch.device("cpu"), dtype=torch.float32, workers=0)
        made = feature_store.plan_cache(net, spec, sets, how, frozen_bn_eval=True, augment=False, views=0,
                                        limit_gb=limit_gb, log=lambda s: None)
        cached, mode = made.cached, made.mode
        assert set(cached) == {"train", "val"}
        return cached, mode

    for _ in ("computed", "found on disk"):
        cached, mode = plan(SPILL)
        assert mode.endswith("(on disk, memory-mapped: val, train)")
        for fs in cached.values():  # the features' bytes are the cache file's pages, not a copy
            assert fs.on_disk is not None and fs.on_disk.parent == own_cache_dir
            assert _mapped_file(fs.features) == os.path.realpath(fs.on_disk)
    memory, _ = plan(2.0)  # the same files, read into memory: the check above tells the two apart
    for phase, fs in memory.items():
        assert fs.on_disk is None and _mapped_file(fs.features) != os.path.realpath(cached[phase].on_disk)
        assert torch.equal(fs.features, cached[phase].features)
    # while the pass runs, the features it computes go straight into the file, not into memory
    store = own_cache_dir / "store.raw"
    computed = feature_store.compute_features(fold_batchnorm(net), "fc", sets["val"],
                                              feature_store.FeaturePass(), store=store)  # as the cache
    assert _mapped_file(computed) == os.path.realpath(store)
    assert torch.equal(computed, memory["val"].features)


def test_the_checksum_reads_the_features_where_they_lie():
    """`_checksum` (state_digest) hashes a tensor's bytes in place: on a memory-mapped cache it
    streams through the pages instead of copying the whole cache into memory."""
    import tracemalloc

    big = torch.zeros(1, 1024, 2048)  # 8 MiB
    tracemalloc.start()
    try:
        feature_store._checksum(big, torch.zeros(1024, dtype=torch.long))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"{peak / 2**20:.1f} MiB allocated to hash 8 MiB"


def _flip_first_feature_bit(path: Path) -> None:
    """Flip one bit of the stored features in place, in the file (a disk's bit rot): the zip
    archive stays well-formed, only the checksum can tell."""
    with zipfile.ZipFile(path) as z:
        record = next(i for i in z.infolist() if i.filename.endswith("/data/0"))  # the first tensor: features
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[record.header_offset + 26:record.header_offset + 30])
    raw[record.header_offset + 30 + name_len + extra_len] ^= 1  # the lowest mantissa bit of features[0, 0, 0]
    path.write_bytes(bytes(raw))


def test_a_damaged_spilled_file_is_reported_and_rebuilt(tiny_data, tiny_backbone, tmp_path, own_cache_dir):
    first = _run(tiny_data, tmp_path / "a", cache_limit_gb=SPILL)
    for path in own_cache_dir.glob("*.pt"):
        _flip_first_feature_bit(path)
    lines = []
    second = _run(tiny_data, tmp_path / "b", lines, cache_limit_gb=SPILL)
    damaged = [line for line in lines if "is damaged (contents do not match their checksum): rebuilding" in line]
    assert len(damaged) == 2, lines
    _assert_same_training(first, second)
    third_lines = []
    _run(tiny_data, tmp_path / "c", third_lines, cache_limit_gb=SPILL)  # the rebuilt files are good again
    assert not any("is damaged" in line for line in third_lines), third_lines


def test_too_little_disk_to_spill_runs_uncached(tiny_data, tiny_backbone, tmp_path, own_cache_dir, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**40 - 2**20, 2**20))  # 1 MiB free
    lines = []
    result = _run(tiny_data, tmp_path / "a", lines, cache_limit_gb=SPILL)
    assert result.config["feature_cache"] == "off (over --cache-limit-gb, too little free disk to keep it on disk)"
    refused = [line for line in lines if "too little to keep it on disk" in line and "running uncached" in line]
    assert len(refused) == 2, lines
    assert not own_cache_dir.exists() or not any(own_cache_dir.iterdir())  # not even a temporary
    # a cache within the limit stays in memory and never asks about the disk
    assert _run(tiny_data, tmp_path / "b").config["feature_cache"] == "train + val (exact: no augmentation)"


def test_the_raw_spill_file_is_a_temporary_that_a_later_run_sweeps(tmp_path):
    fd, raw = files.temporary_beside(tmp_path / "0123abcd.raw")
    os.close(fd)
    assert files.remove_stale_temporaries(tmp_path) == [] and raw.exists()  # its writer (this test) lives
    dead = raw.with_name(raw.name.replace(f".{os.getpid()}.", ".999999999."))  # no such process
    raw.rename(dead)
    assert files.remove_stale_temporaries(tmp_path) == [dead] and not dead.exists()


def test_the_cache_key_changes_with_the_prefix_weights(tiny_data, tiny_backbone):
    spec = get_backbone("tiny")

    class Files:
        samples = [(str(p), 0) for p in sorted((tiny_data / "val").rglob("*.png"))]
        transform = "T"

    def key(net):
        split = features.split_at_cut(net, spec)
        digest = feature_store.prefix_digest(net, split)
        return feature_store.cache_key(digest, Files, feature_store.FeaturePass(
            views=1, random_views=False, seed=0, workers=0, dtype=torch.float32, device="cpu", channels_last=False,
            folded=True))

    a = seeded_tiny_net(1)
    b = copy.deepcopy(a)
    assert key(a) == key(b)
    with torch.no_grad():
        b.stem[0].weight.mul_(2)  # another backbone's weights before the cut; same head, same files
    assert key(a) != key(b)
    assert key(a) != key(seeded_tiny_net(2))


MEAN = (0.5, 0.5, 0.5)


def test_the_feature_cache_key_follows_the_cpu_thread_count(tiny_data):
    ds = image_datasets(tiny_data, build_transforms(MEAN, MEAN, size=32, augment=False))["val"]
    keys = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        keys[threads] = {device: feature_store.cache_key("d", ds, feature_store.FeaturePass(
            views=1, random_views=False, seed=0, workers=0, dtype=torch.float32, device=device, channels_last=False,
            folded=False)) for device in ("cpu", "cuda")}
    assert keys[1]["cpu"] != keys[2]["cpu"]  # CPU features computed on another count differ in the last bits
    assert keys[1]["cuda"] == keys[2]["cuda"]  # a GPU's do not depend on the CPU's threads


def test_a_disk_filled_during_the_spill_falls_back_to_uncached(small_disk, monkeypatch):
    """cached_features runs uncached when the disk lacks room, also when another writer fills the
    disk after the check and the save fails with ENOSPC: None ('running uncached'), not an OSError."""
    monkeypatch.setenv("TL_CACHE_DIR", str(small_disk / "cache"))
    usage = collections.namedtuple("usage", "total used free")
    real_usage, real_fallocate = shutil.disk_usage, os.posix_fallocate
    checks = []

    def disk_usage(path):  # the first check sees room (the other writer has not started yet)
        checks.append(path)
        return usage(2**40, 0, 2**40) if len(checks) == 1 else real_usage(path)

    def fallocate(fd, offset, length):  # then another writer fills all but 2 MiB of the disk
        real_fallocate(fd, offset, length)
        free = real_usage(small_disk).free - 2 * 2**20
        with open(small_disk / "other-writer", "wb") as f:
            f.write(b"\0" * free)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2))  # cut "1": 3072 floats per image
    split = features.CacheSplit(model[1], "1")
    data = torch.utils.data.TensorDataset(torch.randn(300, 3, 32, 32), torch.zeros(300, dtype=torch.long))
    data.targets = [0] * 300  # 300 x 3072 x 4 bytes = 3.5 MiB
    out = feature_store.cached_features(model, split, data, feature_store.FeaturePass(views=1, seed=0, device="cpu"),
                                        key="k", limit_gb=SPILL, log=lambda s: None)
    assert out is None  # "running uncached", not an OSError


def test_a_quota_met_while_saving_a_spilled_cache_runs_uncached(tmp_path, monkeypatch, own_cache_dir):
    """Under a user quota the disk has plenty free while the file's write fails with EDQUOT (kept by
    torch as its RuntimeError's __context__): cached_features runs uncached, as on a full disk,
    rather than failing with an OSError."""
    import errno
    import io
    import os

    from torch import nn

    from tl import features

    real_fdopen = os.fdopen

    class OverQuota(io.FileIO):  # the file's write, once the user's quota is used up mid-file
        written = 0

        def write(self, b):
            self.written += len(b)
            if self.written > 4096:
                raise OSError(errno.EDQUOT, "Disk quota exceeded")
            return super().write(b)

    def fdopen(fd, mode="r", *args, **kwargs):
        return OverQuota(fd, "wb") if mode == "wb" else real_fdopen(fd, mode, *args, **kwargs)

    monkeypatch.setattr(os, "fdopen", fdopen)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    split = features.CacheSplit(model[1], "1")
    data = torch.utils.data.TensorDataset(torch.randn(200, 3, 8, 8), torch.zeros(200, dtype=torch.long))
    data.targets = [0] * 200  # 200 x 192 floats: 150 kB
    out = feature_store.cached_features(model, split, data, feature_store.FeaturePass(views=1, seed=0, device="cpu"),
                                        key="k", limit_gb=1e-9, log=lambda s: None)
    assert out is None  # "running uncached", not OSError(EIO)


def test_the_cache_key_holds_what_changes_the_numbers_and_nothing_else(tiny_data, tiny_backbone):
    files = sorted(str(p) for p in (tiny_data / "val").rglob("*.png"))
    ds = _FakeSet([(f, 0) for f in files])
    net = frozen_tiny()
    split = features.split_at_cut(net, get_backbone("tiny"))
    digest = feature_store.prefix_digest(net, split)
    base = dict(views=1, random_views=False, seed=0, workers=0, dtype=torch.float32, device="cpu",
                channels_last=False, folded=True)
    key = feature_store.cache_key(digest, ds, FeaturePass(**base))
    # nothing else: without random views the seed and the workers do not matter
    assert feature_store.cache_key(digest, ds, FeaturePass(**base | {"seed": 5, "workers": 2})) == key
    # everything that changes the stored numbers does
    for change in ({"folded": False}, {"channels_last": True}, {"dtype": torch.float16}, {"views": 2}):
        assert feature_store.cache_key(digest, ds, FeaturePass(**base | change)) != key, change
    random_key = feature_store.cache_key(digest, ds, FeaturePass(**base | {"random_views": True}))
    assert feature_store.cache_key(digest, ds, FeaturePass(**base | {"random_views": True, "workers": 2})) != random_key
    assert feature_store.cache_key(digest, ds, FeaturePass(**base | {"random_views": True, "seed": 1})) != random_key
    assert feature_store.cache_key(digest, _FakeSet([(f, 1) for f in files]),
                                   FeaturePass(**base)) != key  # other labels
    assert feature_store.cache_key(digest, _FakeSet(ds.samples, "U"), FeaturePass(**base)) != key  # other transform
    # the prefix digest sees BatchNorm's eps (not in the state_dict) and its statistics, not the head
    net.stem[1].eps = 1e-3
    assert feature_store.prefix_digest(net, split) != digest
    net.stem[1].eps = 1e-5
    with torch.no_grad():
        net.fc.weight.add_(1)
    assert feature_store.prefix_digest(net, split) == digest
    net.block[1].running_var.add_(1)
    assert feature_store.prefix_digest(net, split) != digest


@pytest.mark.parametrize("how", ["truncated", "swapped rows", "flipped mantissa bits", "too few rows",
                                 "not a torch file"])
def test_a_damaged_cache_file_is_reported_and_rebuilt(tiny_data, pretrained, tmp_path, own_cache_dir, how):
    from experiments.recipes import resnet_frozen
    from tl.engine.options import RunOptions
    from tl.engine.run import run

    def go(out, lines):
        opts = RunOptions(data=tiny_data, backbone="tiny", weights=str(pretrained), epochs=2, workers=0, out=out,
                          image_size=32, progress=False, plots=False, augment=False, lr_scale=20)
        return run(resnet_frozen.RECIPE, resnet_frozen.build, opts, log=lines.append)

    first = go(tmp_path / "a", [])
    for path in own_cache_dir.glob("*.pt"):
        _damage(path, how)
    lines = []
    second = go(tmp_path / "b", lines)
    assert sum("is damaged" in line and "rebuilding" in line for line in lines) == 2, lines
    assert without_timings(first.history.rows) == without_timings(second.history.rows)
    third_lines = []
    go(tmp_path / "c", third_lines)  # the rebuilt files are good again
    assert not any("is damaged" in line for line in third_lines), third_lines


def test_cached_views_are_distinct_augmented_crops(tiny_data, tiny_backbone, tmp_path, own_cache_dir):
    from experiments.recipes import resnet_frozen
    from tl.engine.options import RunOptions
    from tl.engine.run import run

    opts = RunOptions(data=tiny_data, backbone="tiny", weights="none", epochs=1, workers=0, out=tmp_path,
                      image_size=32, progress=False, plots=False, cache_views=3)
    run(resnet_frozen.RECIPE, resnet_frozen.build, opts, log=lambda s: None)
    shapes = {}
    for path in own_cache_dir.glob("*.pt"):
        f = torch.load(path, weights_only=True)["features"]
        shapes[f.shape[0]] = f
    views = shapes[3]  # train: 3 views of 24 images; val: 1 view
    assert views.shape[1] == 24 and shapes[1].shape[1] == 12
    assert not torch.equal(views[0], views[1]) and not torch.equal(views[1], views[2])


def test_the_feature_cache_key_names_the_reader(tiny_data, monkeypatch):
    ds = CheckedImageFolder(tiny_data / "val", build_transforms(MEAN, STD, size=16, augment=False)["val"])

    def key():
        return feature_store.cache_key("d", ds, feature_store.FeaturePass(
            views=1, random_views=False, seed=0, workers=0, dtype=torch.float32, device="cpu", channels_last=False,
            folded=False))

    before = key()
    monkeypatch.setattr(feature_store, "READER", images.READER + ", and something new")
    assert key() != before  # features stored by another reader are not found again


class _FakeSet:
    def __init__(self, samples, transform="T"):
        self.samples, self.transform = samples, transform


def _damage(path, how):
    stored = torch.load(path, weights_only=True)
    f = stored["features"]
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return
    if how == "swapped rows":
        f[:, [0, 1]] = f[:, [1, 0]]
    elif how == "flipped mantissa bits":
        f.view(torch.int32)[0, 0, :4] ^= 1
    elif how == "too few rows":
        stored["features"] = f[:, :-1].clone()
    elif how == "not a torch file":
        path.write_text("hello")
        return
    torch.save(stored, path)


MEAN = STD = (0.5, 0.5, 0.5)
