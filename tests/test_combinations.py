"""Features that share state, tried together: what a hostile review of --device-images, the
feature cache's spill to disk and --evaluate --split train on --train-per-class runs found.
Each test failed on the code as reviewed (commit 2c2dbd2) and guards its fix. The full-disk
tests mount a small tmpfs, a disk that really fills up; without root they are skipped."""

from __future__ import annotations

import collections
import errno
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

import main
from experiments import get_experiment
from experiments.recipes import resnet_frozen
from tl import features
from tl.data import build_transforms
from tl.engine import feature_store, files
from tl.engine.options import RunOptions
from tl.engine.run import resume_run, run
from tl.engine.selection import _first_per_class, image_datasets, nested_draw

SPILL = 1e-9  # GB: every cache of the tiny data set is over it


pytestmark = pytest.mark.usefixtures("own_cache_dir")  # every test: a feature-cache folder of its own


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in rows]


# ----------------------------------------------------------------------------- 1. evaluate --split train
def test_evaluate_train_split_scores_the_draw_of_a_max_per_class_run(tiny_data, tiny_backbone, tmp_path):
    """--train-per-class 3 with --max-per-class 6 (or --quick's 8) trains on a draw from the
    first 6 images per class; --evaluate --split train draws 3 from *all* 12: other images."""
    module = get_experiment("resnet_finetune")
    opts = RunOptions(data=tiny_data, backbone="tiny", weights="none", epochs=1, batch_size=4, workers=0,
                      out=tmp_path / "runs", image_size=32, progress=False, plots=False,
                      max_per_class=6, train_per_class=3)
    result = run(module.RECIPE, module.build, opts, log=lambda s: None)
    from tl.engine.evaluate import split_loader
    from tl.engine.model_loading import context_for

    loader, _ = split_loader(tiny_data, "train", context_for(result.run_dir / "best.pth", None), log=lambda s: None)
    full = image_datasets(tiny_data, build_transforms((0.5,) * 3, (0.5,) * 3, size=32))["train"]
    trained = nested_draw(_first_per_class(full.samples, 6), full.classes, 3, seed=0)
    assert loader.dataset.samples == trained


# ----------------------------------------------------------------------------- 2. a full disk reads as EIO
def _mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True,
                       capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs root to mount a small tmpfs (a disk that really fills up)")


@pytest.fixture
def small_disk(tmp_path):
    where = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    _mount_tmpfs(where, "8m")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_is_reported_as_enospc_not_eio(small_disk):
    """atomic_write deletes its temporary *before* measuring the free space, so the space the
    temporary took counts as free: a full disk is reported as 'errno 5 EIO, 8.0 MB free'."""
    with pytest.raises(OSError) as info:
        files.atomic_save({"x": torch.zeros(3 * 2**20)}, small_disk / "c.pt")  # 12 MB on 8 MB
    assert info.value.errno == errno.ENOSPC, info.value


def test_a_disk_filled_during_the_spill_falls_back_to_uncached(small_disk, monkeypatch):
    """cached_features promises 'uncached only when the disk lacks room' and catches ENOSPC
    for 'another writer filled the disk meanwhile'; but the save's failure arrives as EIO
    (above), so the run crashes instead."""
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


# ----------------------------------------------------------------------------- 3. resume and free disk
def test_resume_after_a_run_left_uncached_for_lack_of_disk_equals_the_uninterrupted_run(
        tiny_data, tiny_backbone, tmp_path, monkeypatch):
    """Whether a spilled cache is used now depends on free disk space at the moment the stage
    starts, not on the run's options: a run started on a nearly full disk trains uncached;
    resumed after space was freed it trains cached (folded BatchNorm: other floats). The
    resumed run differs from the uninterrupted one, and nothing refuses or says so."""
    usage = collections.namedtuple("usage", "total used free")
    real = shutil.disk_usage

    def opts(out, epochs):
        return RunOptions(data=tiny_data, backbone="tiny", weights="none", epochs=epochs, workers=0, out=out,
                          image_size=32, progress=False, plots=False, augment=False, lr_scale=20,
                          cache_limit_gb=SPILL, run_name="r")

    with monkeypatch.context() as m:
        m.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**40 - 2**20, 2**20))  # 1 MiB free
        full = run(resnet_frozen.RECIPE, resnet_frozen.build, opts(tmp_path / "full", 4), log=lambda s: None)
        half = run(resnet_frozen.RECIPE, resnet_frozen.build, opts(tmp_path / "half", 2), log=lambda s: None)
    assert full.config["feature_cache"].startswith("off")
    assert shutil.disk_usage is real  # the disk has room again
    resumed = resume_run(half.run_dir / "last.ckpt", {"epochs": 4}, get_experiment, log=lambda s: None)
    assert _strip(resumed.history.rows) == _strip(full.history.rows)
    for name, tensor in full.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


# ----------------------------------------------------------------------------- 4. the API's device_images
def test_api_device_images_with_workers_trains_like_the_image_cache_without_workers(
        tiny_data, tiny_backbone, tmp_path):
    """RunOptions(device_images=True, workers=2) is accepted (tests/test_device_images.py relies
    on it) and the loop runs without workers, but the feature pass of --cache-views still
    uses the 2 workers (other random crops, another cache key), and config.json records
    workers 2: on the CPU it does not train like --image-cache --workers 0."""
    def go(out, **kw):
        o = RunOptions(data=tiny_data, backbone="tiny", weights="none", epochs=2, out=out, image_size=32,
                       progress=False, plots=False, cache_views=2, **kw)
        return run(resnet_frozen.RECIPE, resnet_frozen.build, o, log=lambda s: None)

    a = go(tmp_path / "a", image_cache=True, workers=0)
    b = go(tmp_path / "b", device_images=True, workers=2)
    assert _strip(a.history.rows) == _strip(b.history.rows)
    assert b.config["options"]["workers"] == 0  # what the run actually used


# ----------------------------------------------------------------------------- 5. evaluate on another folder
def test_evaluating_the_train_split_of_another_folder_says_what_went_wrong(tiny_data, tiny_backbone, tmp_path,
                                                                          capsys):
    """A --train-per-class 3 run, scored with --evaluate --split train --data SMALL (2 images a
    class): the message tells the user to choose a smaller --train-per-class, an option
    --evaluate does not take."""
    from tests.conftest import write_image_folder

    small = write_image_folder(tmp_path / "small", train=2, val=2, seed=1)
    module = get_experiment("resnet_finetune")
    opts = RunOptions(data=tiny_data, backbone="tiny", weights="none", epochs=1, batch_size=4, workers=0,
                      out=tmp_path / "runs", image_size=32, progress=False, plots=False, train_per_class=3)
    result = run(module.RECIPE, module.build, opts, log=lambda s: None)
    code = main.main(["--evaluate", str(result.run_dir / "best.pth"), "--split", "train", "--data", str(small)])
    err = capsys.readouterr().err
    assert code == 2
    assert "choose a smaller number" not in err and "cannot be scored as the run saw it" in err, err


# ----------------------------------------------------------------------------- 6. --device-images refused quietly
def test_device_images_over_the_limit_does_not_leave_the_run_decoding_without_workers(
        tiny_data, tiny_backbone, tmp_path, monkeypatch, capsys):
    """--device-images forces --workers 0 on the command line before knowing whether the images
    fit --cache-limit-gb (default 2 GB, a GPU's memory is far larger). When they do not, the
    image cache is dropped with one log line and the run decodes every JPEG in the main
    process with no workers: much slower than not asking for the option at all."""
    from tl.engine import stage_setup

    seen = []
    real = stage_setup.make_loaders
    monkeypatch.setattr(stage_setup, "make_loaders",
                        lambda inputs, bs, **kw: seen.append((kw["workers"], {type(d).__name__ for d in
                                                                              inputs.values()})) or
                        real(inputs, bs, **kw))
    code = main.main(["-e", "resnet_finetune", "-b", "tiny", "--weights", "none", "--data", str(tiny_data),
                      "--no-progress", "--quick", "--device-images", "--cache-limit-gb", "1e-9",
                      "--out", str(tmp_path / "runs")])
    assert code == 2 and seen == []  # refused before any loader, with the way out in the message
    assert "raise --cache-limit-gb" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- 7. torchrun: process 0 decides
def test_every_process_follows_process_0_when_it_trains_uncached(tiny_data, tiny_backbone, tmp_path, monkeypatch):
    """Under torchrun, process 0 may fall back to training uncached (no disk room) while another
    process, checking a moment later, finds room: the processes would then compute different
    floats. Every process takes process 0's 'off' (tl.distributed.from_main stands in for the
    broadcast here), so this process trains exactly like an uncached run."""
    from tl import distributed

    def go(out, **kw):
        o = RunOptions(data=tiny_data, backbone="tiny", weights="none", epochs=2, out=out, image_size=32, workers=0,
                       progress=False, plots=False, augment=False, lr_scale=20, **kw)
        return run(resnet_frozen.RECIPE, resnet_frozen.build, o, log=lambda s: None)

    uncached = go(tmp_path / "a", feature_cache=False)
    modes = ("off", "val only", "train + val")  # what plan_cache reports; other broadcasts pass through
    monkeypatch.setattr(distributed, "from_main", lambda obj: "off (process 0: too little disk)"
                        if isinstance(obj, str) and obj.startswith(modes) else obj)
    follower = go(tmp_path / "b")
    assert follower.config["feature_cache"] == "off (process 0: too little disk)"
    assert _strip(follower.history.rows) == _strip(uncached.history.rows)
    for name, tensor in uncached.model.state_dict().items():
        assert torch.equal(tensor, follower.model.state_dict()[name]), name
