"""Features that share state, tried together (second round): what a hostile review of the
first round's fixes (tests/test_combinations.py) found. Each test failed on the code as
reviewed (commit 4da2eec) and guards its fix: a staged --device-images run refused only
after its first stage, a resume inside a stage whose train phase ran uncached, --evaluate
of a --verify-images run, a disk quota met while saving, and a run saved before the
workers rule of --device-images."""

from __future__ import annotations

import collections
import shutil

import pytest
import torch

import main
from experiments import get_experiment
from experiments.recipes import resnet_frozen
from tl.engine import feature_store
from tl.engine.options import RunOptions
from tl.engine.run import resume_run, run

pytestmark = pytest.mark.usefixtures("own_cache_dir")  # every test: a feature-cache folder of its own


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in rows]


# ----------------------------------------------------------------------------- 1. --device-images, staged
def test_device_images_over_the_limit_is_refused_before_a_staged_run_trains(tiny_data, tiny_backbone, tmp_path,
                                                                              capsys):
    """modern_finetune --no-augment: stage 1 (frozen body) runs on cached features, so no image
    is decoded and the image cache was first sized (and refused) when stage 2 started, after
    stage 1 has trained and saved. The run then stopped with 'raise --cache-limit-gb or leave
    out --device-images', and a resume could do neither (both are refused as changing the
    result): the run could never finish; now run() refuses it first."""
    out = tmp_path / "runs"
    argv = ["-e", "modern_finetune", "-b", "tiny", "--weights", "none", "--data", str(tiny_data), "--out", str(out),
            "--epochs", "2", "--batch-size", "4", "--quick", "--no-progress", "--no-augment",
            "--device-images", "--cache-limit-gb", "1e-9"]
    assert main.main(argv) == 2
    assert "raise --cache-limit-gb" in capsys.readouterr().err
    runs = list(out.iterdir()) if out.exists() else []
    if runs:  # it trained stage 1 first: then the way out the message names must work
        code = main.main(["--resume", str(runs[0] / "last.ckpt"), "--no-progress", "--cache-limit-gb", "1"])
        err = capsys.readouterr().err
        assert code == 0, err


# ----------------------------------------------------------------------------- 2. partial cache and resume
def test_resume_inside_a_stage_whose_train_phase_ran_uncached_for_lack_of_disk(tiny_data, pretrained, tmp_path,
                                                                                 monkeypatch):
    """fa194bb keeps a resumed stage uncached only when its saved mode starts with 'off'. With
    room on the disk for val's spilled features but not train's, the mode is 'val only (train:
    too little free disk)': train ran uncached. Resumed after space was freed, train is
    cached (folded BatchNorm, other floats): the resumed run differs from the uninterrupted
    one, which is the very case fa194bb meant to fix (it only warns)."""

    usage = collections.namedtuple("usage", "total used free")
    # val: 12 x 16 floats = 768 B, train: 24 x 16 = 1536 B; room for 2 x val but not 2 x train
    free = feature_store.DISK_MARGIN + 2 * 768 + 100

    def opts(out, epochs):
        return RunOptions(data=tiny_data, backbone="tiny", weights=str(pretrained), epochs=epochs, workers=0,
                          out=out, image_size=32, progress=False, plots=False, augment=False, lr_scale=20,
                          batch_size=5, cache_limit_gb=1e-9, run_name="r")

    with monkeypatch.context() as m:
        m.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**40 - free, free))
        full = run(resnet_frozen.RECIPE, resnet_frozen.build, opts(tmp_path / "full", 4), log=lambda s: None)
        half = run(resnet_frozen.RECIPE, resnet_frozen.build, opts(tmp_path / "half", 2), log=lambda s: None)
    assert full.config["feature_cache"].startswith("val only (train: too little free disk)"), full.config
    logs = []
    resumed = resume_run(half.run_dir / "last.ckpt", {"epochs": 4}, get_experiment, log=logs.append)
    assert _strip(resumed.history.rows) == _strip(full.history.rows), [s for s in logs if "cache" in s]
    for name, tensor in full.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


# ----------------------------------------------------------------------------- 3. evaluate train, verified run
def test_evaluate_train_split_of_a_verify_images_run_scores_the_images_it_trained_on(tiny_data, tiny_backbone,
                                                                                      tmp_path):
    """A --verify-images run (what read_image's message tells a user to do when a file breaks
    mid-run) skips a PNG whose IDAT data is corrupt but whose IEND is present (the quick scan
    passes it). split_loader rebuilds the train draw from a scan *without* verify (ModelContext
    does not carry verify_images): the broken file is back in the list, so the seeded
    --train-per-class draw is another set of images, not 'the images the run trained on'."""
    from tl.engine.evaluate import split_loader
    from tl.engine.model_loading import context_for

    bad = tiny_data / "train" / "class_0" / "000.png"
    data = bytearray(bad.read_bytes())
    i = data.find(b"IDAT")
    for k in range(i + 20, i + 60):
        data[k] ^= 0xFF
    bad.write_bytes(bytes(data))
    module = __import__("experiments.recipes.resnet_finetune", fromlist=["RECIPE"])
    opts = RunOptions(data=tiny_data, backbone="tiny", weights="none", epochs=1, batch_size=4, workers=0,
                      out=tmp_path / "runs", image_size=32, progress=False, plots=False, verify_images=True,
                      train_per_class=3)
    result = run(module.RECIPE, module.build, opts, log=lambda s: None)
    from tl.data import build_transforms
    from tl.engine.selection import image_datasets, keep_train_per_class

    trained = image_datasets(tiny_data, build_transforms((0.5,) * 3, (0.5,) * 3, size=32), verify=True)["train"]
    keep_train_per_class(trained, 3, 0)
    loader, _ = split_loader(tiny_data, "train", context_for(result.run_dir / "best.pth", None), log=lambda s: None)
    assert loader.dataset.samples == trained.samples


# ----------------------------------------------------------------------------- 4. a quota reads as EIO
def test_a_quota_met_while_saving_a_spilled_cache_runs_uncached(tmp_path, monkeypatch, own_cache_dir):
    """fa194bb lets cached_features run uncached on EDQUOT, but the failure arrives through
    atomic_save, which turns torch.save's RuntimeError into ENOSPC only when the *disk* has under
    1 MiB free. Under a user quota the disk has plenty free: the OSError(EDQUOT) of the file's
    write (kept by torch as the RuntimeError's __context__) is reported as EIO, and the run
    crashes instead of running uncached."""
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


# ----------------------------------------------------------------------------- 5. pre-fa194bb device_images run
def test_resume_of_a_device_images_run_made_before_the_workers_rule(tiny_data, pretrained, tmp_path, monkeypatch):
    """Before fa194bb, RunOptions(device_images=True, workers=2) kept workers=2 (config.json
    records it) and the feature pass of --cache-views drew its random views with 2 workers.
    resume_options now rebuilds RunOptions(**saved), whose __post_init__ silently turns the
    saved workers 2 into 0: the resumed run computes other views (another cache key) and
    differs from the uninterrupted run it continues, with no warning and no refusal."""
    import tl.engine.run

    def opts(out, epochs):
        return RunOptions(data=tiny_data, backbone="tiny", weights=str(pretrained), epochs=epochs, workers=2,
                          out=out, image_size=32, progress=False, plots=False, lr_scale=20, batch_size=5,
                          cache_views=2, device_images=True, image_cache=True, run_name="r")

    with monkeypatch.context() as m:  # the code before fa194bb: no __post_init__
        m.setattr(tl.engine.options.RunOptions, "__post_init__", lambda self: None)
        full = run(resnet_frozen.RECIPE, resnet_frozen.build, opts(tmp_path / "full", 4), log=lambda s: None)
        half = run(resnet_frozen.RECIPE, resnet_frozen.build, opts(tmp_path / "half", 2), log=lambda s: None)
    assert half.config["options"]["workers"] == 2
    logs = []
    resumed = resume_run(half.run_dir / "last.ckpt", {"epochs": 4}, get_experiment, log=logs.append)
    assert _strip(resumed.history.rows) == _strip(full.history.rows) or any("warning" in s for s in logs)
