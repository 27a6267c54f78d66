"""Exactness: a resumed run equals an uninterrupted one, in every combination of the
features that share state (feature cache, augmentation and cached views, workers, --quick,
early stopping, a second resume, a schedule, the average of the weights, balancing,
--device-images, a cache left off for lack of disk), and two ways that must train alike do.
What a resume refuses is tests/test_resume_command.py's; the cache's own exactness is
tests/test_features.py's.

The frozen recipe starts from a weights *file* (not a seeded random init), so a resume
that built or cached from the wrong backbone weights would show in the numbers.
"""

from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

import main
import tl.engine.run
from experiments import get_experiment
from experiments.recipes import resnet_frozen
from tests.conftest import write_image_folder
from tests.helpers import (
    assert_recorded_digests_match,
    assert_same_run,
    train_frozen,
    train_scratch,
    train_with_ema,
    without_timings,
)
from tl import Interrupted
from tl.engine import checkpoint, feature_store
from tl.engine.options import RunOptions
from tl.engine.run import resume_run, run
from tl.models import param_groups, set_trainable

pytestmark = pytest.mark.usefixtures("own_cache_dir")  # every test: a feature-cache folder of its own


COMBINATIONS = {
    "cache, no augmentation": ["--no-augment"],
    "no cache, no augmentation": ["--no-augment", "--no-feature-cache"],
    "cache val only, augmentation": [],
    "cached views": ["--cache-views", "2"],
    "workers 2, augmentation": ["--workers", "2"],
    "workers 0, augmentation": ["--workers", "0"],
    "images on the device, augmentation": ["--device-images"],
    "quick": ["--quick"],
    "early stopping": ["--patience", "1", "--monitor", "loss", "--no-augment"],
}


# ----------------------------------------------------------------------------- resume equals the uninterrupted run
@pytest.mark.parametrize("extra", COMBINATIONS.values(), ids=COMBINATIONS.keys())
def test_resume_equals_an_uninterrupted_run(tiny_data, pretrained, tmp_path, extra):
    full = train_frozen(tiny_data, tmp_path / "full", 4, *extra, weights=pretrained)
    half = train_frozen(tiny_data, tmp_path / "half", 2, *extra, weights=pretrained)
    stopped = checkpoint.load_checkpoint(half / "last.ckpt")["history"]["stopped_early"]
    # the printed command: --resume alone restores every option (workers, quick, cache, ...)
    code = main.main(["--resume", str(half / "last.ckpt"), "--epochs", "4", "--no-progress"])
    assert code == (2 if stopped is not None else 0)
    if stopped is None:
        assert_same_run(full, half)
    else:  # stopped early before the cut: the uninterrupted run stopped at the same epoch
        assert checkpoint.load_checkpoint(full / "last.ckpt")["history"]["stopped_early"] == stopped


@pytest.mark.parametrize("workers", ["0", "2"])
def test_resume_equals_an_uninterrupted_run_with_and_without_workers(tiny_data, tiny_backbone, tmp_path, workers):
    full = train_scratch(tiny_data, tmp_path / "full", 4, "--workers", workers)
    half = train_scratch(tiny_data, tmp_path / "half", 2, "--workers", workers)
    assert main.main(["--resume", str(half / "last.ckpt"), "--epochs", "4", "--workers", workers,
                      "--no-progress"]) == 0
    a, b = checkpoint.load_checkpoint(full / "last.ckpt"), checkpoint.load_checkpoint(half / "last.ckpt")
    assert a["epoch"] == b["epoch"] == 4
    assert without_timings(a["history"]["rows"]) == without_timings(b["history"]["rows"])
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for name, tensor in checkpoint.load_state_file(full / "best.pth").items():
        assert torch.equal(tensor, checkpoint.load_state_file(half / "best.pth")[name])
    assert pd.read_csv(half / "history.csv").shape == pd.read_csv(full / "history.csv").shape


def test_a_second_resume_after_an_interrupted_one(tiny_data, pretrained, tmp_path, monkeypatch):
    full = train_frozen(tiny_data, tmp_path / "full", 4, "--no-augment", weights=pretrained)
    half = train_frozen(tiny_data, tmp_path / "half", 1, "--no-augment", weights=pretrained)
    write = tl.engine.run_folder.write_history_csv

    def interrupt_after_epoch_2(history, path):
        write(history, path)
        if history.rows[-1]["epoch"] == 2:
            raise KeyboardInterrupt  # Ctrl-C right after epoch 2 was saved

    with monkeypatch.context() as patch:
        patch.setattr(tl.engine.run_folder, "write_history_csv", interrupt_after_epoch_2)
        assert main.main(["--resume", str(half / "last.ckpt"), "--epochs", "4", "--no-progress"]) == 130  # Ctrl-C
    assert checkpoint.load_checkpoint(half / "last.ckpt")["epoch"] == 2
    # the printed command (no --epochs) remembers the raised total of 4
    assert main.main(["--resume", str(half / "last.ckpt"), "--no-progress"]) == 0
    assert_same_run(full, half)
    config = json.loads((half / "config.json").read_text())
    assert config["train_epochs"] == 4 and config["options"]["epochs"] == 4
    assert [r["after_epoch"] for r in config["resumed"]] == [1, 2]
    assert not list(half.glob(".*.tmp"))


def test_best_pth_stays_valid_when_a_resumed_run_finds_no_new_best(tiny_data, pretrained, tmp_path, capsys):
    """The checkpoint of the best epoch already carries best.pth's digest, so a resume that finds
    no better epoch leaves config.json naming the best.pth on disk, not the previous best's."""
    half = train_frozen(tiny_data, tmp_path / "half", 2, "--save-every-epoch", "--monitor", "loss", weights=pretrained)
    config = json.loads((half / "config.json").read_text())
    ckpt = checkpoint.load_checkpoint(half / "last.ckpt")
    assert ckpt["config"]["checksums"] == config["checksums"]  # the checkpoint knows this epoch's files
    (half / "best.pth").unlink(), (half / "02.pth").unlink()  # killed right after last.ckpt was written
    assert main.main(["--resume", str(half / "last.ckpt"), "--epochs", "3", "--no-progress"]) == 0
    assert_recorded_digests_match(half)
    assert main.main(["--evaluate", str(half / "best.pth"), "--data", str(tiny_data)]) == 0
    capsys.readouterr()


STEP_LR = tl.engine.run.Recipe(name="step_lr_head", source="tests", strategy="head only, StepLR(2, 0.1)",
                           backbone="tiny", weights="none", lrs={"head": 0.05}, train_epochs=4, batch_size=8,
                           frozen_bn_eval=True)


def _build_step_lr(model, spec, recipe):
    set_trainable(model, spec, ["head"])
    optimizer = torch.optim.SGD(param_groups(model, spec, recipe.lrs), momentum=0.9)
    return model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.1)


def test_a_resumed_run_continues_with_the_right_learning_rate(tiny_data, tiny_backbone, tmp_path, monkeypatch):
    def opts(out):  # every phase on stored features: seconds, not minutes
        return tl.engine.options.RunOptions(data=tiny_data, epochs=4, workers=0, out=out, run_name="r", image_size=32,
                                    augment=False, progress=False, plots=False)

    full = tl.engine.run.run(STEP_LR, _build_step_lr, opts(tmp_path / "full"), log=lambda s: None)
    write = tl.engine.run_folder.write_history_csv

    def interrupt_after_epoch_1(history, path):
        write(history, path)
        if history.rows[-1]["epoch"] == 1:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(tl.engine.run_folder, "write_history_csv", interrupt_after_epoch_1)
        with pytest.raises(Interrupted):
            tl.engine.run.run(STEP_LR, _build_step_lr, opts(tmp_path / "half"), log=lambda s: None)
    saved = tmp_path / "half" / "r" / "last.ckpt"
    ckpt = checkpoint.load_checkpoint(saved)
    assert ckpt["epoch"] == 1
    resumed = tl.engine.run.run(STEP_LR, _build_step_lr, opts(tmp_path / "half"), ckpt=ckpt, resume=saved,
                            log=lambda s: None)

    a = checkpoint.load_checkpoint(tmp_path / "full" / "r" / "last.ckpt")
    b = checkpoint.load_checkpoint(saved)
    # StepLR(2, 0.1) after 4 epochs: two decays
    assert a["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.05 * 0.1 ** 2)
    assert b["optimizer"]["param_groups"][0]["lr"] == pytest.approx(a["optimizer"]["param_groups"][0]["lr"])
    assert b["scheduler"]["last_epoch"] == a["scheduler"]["last_epoch"] == 4
    strip = [{k: r[k] for k in ("epoch", "phase", "loss", "acc")} for r in full.history.rows]
    assert [{k: r[k] for k in ("epoch", "phase", "loss", "acc")} for r in resumed.history.rows] == strip


def test_resume_with_an_average_equals_the_uninterrupted_run(tiny_data, pretrained, tmp_path):
    """modern_finetune without augmentation: its first stage trains the head on cached features
    (the loop's net is `FeaturesOrImages`), the second the whole network on images; one average
    runs through both, and the cut falls on their boundary."""
    full = train_with_ema(tiny_data, tmp_path / "full", "modern_finetune", 3, pretrained)
    half = train_with_ema(tiny_data, tmp_path / "half", "modern_finetune", 1, pretrained)
    resume_run(half / "last.ckpt", {"epochs": 3}, get_experiment, log=lambda s: None)
    stages = json.loads((full / "config.json").read_text())["stages"]
    assert stages[0]["feature_cache"].startswith("train + val") and stages[1]["feature_cache"].startswith("off")
    a, b = checkpoint.load_checkpoint(full / "last.ckpt"), checkpoint.load_checkpoint(half / "last.ckpt")
    assert without_timings(a["history"]["rows"]) == without_timings(b["history"]["rows"])
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(t, b[part][k]) for k, t in a[part].items()), part
    assert int(a["ema"]["n_averaged"]) > 1
    best_a, best_b = (checkpoint.load_state_file(d / "best.pth") for d in (full, half))
    assert all(torch.equal(t, best_b[k]) for k, t in best_a.items())
    # what is saved and scored is the average: best.pth holds the average's weights, not the training weights
    results = json.loads((full / "config.json").read_text())["results"]
    if results["best_epoch"] == a["epoch"]:
        assert all(torch.equal(t, checkpoint.scored_weights(a)[k]) for k, t in best_a.items())
    assert not torch.equal(best_a["fc.weight"], a["model"]["fc.weight"])
    assert best_a.keys() == a["model"].keys()  # the whole network's weights, also when the loop saw the head alone
    # the headline (no test split: val, final epoch) scores the average the last val row scored
    assert results["headline_acc"] == results["final_val_acc"]


def test_a_resumed_device_images_run_equals_an_uninterrupted_one(tiny_data, tiny_backbone, tmp_path):
    """On the CPU `--device-images` keeps the images on the CPU and takes the batched path."""
    from tests.helpers import train_scratch, without_timings
    from tl.engine import checkpoint

    full = train_scratch(tiny_data, tmp_path / "full", 3, "--device-images")
    half = train_scratch(tiny_data, tmp_path / "half", 1, "--device-images")
    assert main.main(["--resume", str(half / "last.ckpt"), "--epochs", "3", "--no-progress"]) == 0
    a, b = checkpoint.load_checkpoint(full / "last.ckpt"), checkpoint.load_checkpoint(half / "last.ckpt")
    assert without_timings(a["history"]["rows"]) == without_timings(b["history"]["rows"]) and a["epoch"] == 3
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def _unbalanced(root: Path) -> Path:
    """class_0: 12 training images, class_1: 3 (4x fewer); val balanced."""
    data = write_image_folder(root, train=12, val=6)
    for extra in sorted((data / "train" / "class_1").iterdir())[3:]:
        extra.unlink()
    return data


def test_unbalanced_runs_say_so_and_both_options_resume_exactly_with_the_feature_cache(
        tmp_path, pretrained, own_cache_dir, capsys):
    data = _unbalanced(tmp_path / "data")
    options = ("--class-weights", "auto", "--balanced-sampler", "--no-augment")  # no augmentation: train cached
    full = train_frozen(data, tmp_path / "full", 3, *options, weights=pretrained)
    printed = capsys.readouterr().out
    assert "differ in size by more than 3x (class_0 12, class_1 3)" in printed
    assert "Balancing with --class-weights and --balanced-sampler" in printed
    assert "feature cache: train + val" in printed
    config = json.loads((full / "config.json").read_text())
    assert config["options"]["class_weights"] == "auto" and config["options"]["balanced_sampler"] is True
    assert config["train_class_counts"] == {"class_0": 12, "class_1": 3}
    half = train_frozen(data, tmp_path / "half", 1, *options, weights=pretrained)
    assert main.main(["--resume", str(half / "last.ckpt"), "--epochs", "3", "--no-progress"]) == 0
    assert_same_run(full, half)
    plain = train_frozen(data, tmp_path / "plain", 3, "--no-augment", weights=pretrained)
    assert "try --class-weights auto (the loss) or --balanced-sampler" in capsys.readouterr().out
    assert pd.read_csv(plain / "history.csv").loss.tolist() != pd.read_csv(full / "history.csv").loss.tolist()


# ----------------------------------------------------------------------------- resume and the feature cache
def test_resume_restores_the_backbone_before_caching(tiny_data, pretrained, tmp_path, own_cache_dir):
    """The cache is computed from the restored weights: the resumed run finds exactly the cache
    files the first run made (same key, same weights) and adds none."""
    half = train_frozen(tiny_data, tmp_path / "half", 1, "--no-augment", weights=pretrained)
    before = sorted(own_cache_dir.iterdir())
    assert main.main(["--resume", str(half / "last.ckpt"), "--epochs", "2", "--no-progress"]) == 0
    assert sorted(own_cache_dir.iterdir()) == before


SPILL = 1e-9  # GB: every cache of the tiny data set is over it


def test_resume_after_a_run_left_uncached_for_lack_of_disk_equals_the_uninterrupted_run(
        tiny_data, tiny_backbone, tmp_path, monkeypatch):
    """Whether a spilled cache is used depends on the free disk space when the stage starts: a run
    started on a nearly full disk trains uncached. Resumed after space was freed, it goes on
    uncached (cached, folded BatchNorm would give other floats) and equals the uninterrupted run."""
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
    assert without_timings(resumed.history.rows) == without_timings(full.history.rows)
    for name, tensor in full.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_resume_inside_a_stage_whose_train_phase_ran_uncached_for_lack_of_disk(tiny_data, pretrained, tmp_path,
                                                                                 monkeypatch):
    """With room on the disk for val's spilled features but not train's, the mode is 'val only
    (train: too little free disk)': train ran uncached. Resumed after space was freed, train
    stays uncached (cached, folded BatchNorm would give other floats), so the resumed run
    equals the uninterrupted one."""

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
    assert without_timings(resumed.history.rows) == without_timings(full.history.rows), \
        [s for s in logs if "cache" in s]
    for name, tensor in full.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_resume_of_a_device_images_run_that_recorded_two_workers(tiny_data, pretrained, tmp_path, monkeypatch):
    """A --device-images run whose config.json records workers 2 (RunOptions without the
    __post_init__ that turns them into 0), its --cache-views random views drawn with 2 workers:
    resumed (resume_options rebuilds RunOptions(**saved)), it equals the uninterrupted run it
    continues, or says why not in a warning; never silently other views."""
    import tl.engine.run

    def opts(out, epochs):
        return RunOptions(data=tiny_data, backbone="tiny", weights=str(pretrained), epochs=epochs, workers=2,
                          out=out, image_size=32, progress=False, plots=False, lr_scale=20, batch_size=5,
                          cache_views=2, device_images=True, image_cache=True, run_name="r")

    with monkeypatch.context() as m:  # RunOptions without its __post_init__
        m.setattr(tl.engine.options.RunOptions, "__post_init__", lambda self: None)
        full = run(resnet_frozen.RECIPE, resnet_frozen.build, opts(tmp_path / "full", 4), log=lambda s: None)
        half = run(resnet_frozen.RECIPE, resnet_frozen.build, opts(tmp_path / "half", 2), log=lambda s: None)
    assert half.config["options"]["workers"] == 2
    logs = []
    resumed = resume_run(half.run_dir / "last.ckpt", {"epochs": 4}, get_experiment, log=logs.append)
    assert without_timings(resumed.history.rows) == without_timings(full.history.rows) \
        or any("warning" in s for s in logs)


# ----------------------------------------------------------------------------- two ways that train alike
def test_api_device_images_with_workers_trains_like_the_image_cache_without_workers(
        tiny_data, tiny_backbone, tmp_path):
    """RunOptions(device_images=True, workers=2) is accepted (tests/engine/test_image_cache.py relies
    on it) and runs with no workers, the feature pass of --cache-views included (its random crops
    and cache key depend on them), and config.json records workers 0: on the CPU it trains
    exactly like --image-cache --workers 0."""
    def go(out, **kw):
        o = RunOptions(data=tiny_data, backbone="tiny", weights="none", epochs=2, out=out, image_size=32,
                       progress=False, plots=False, cache_views=2, **kw)
        return run(resnet_frozen.RECIPE, resnet_frozen.build, o, log=lambda s: None)

    a = go(tmp_path / "a", image_cache=True, workers=0)
    b = go(tmp_path / "b", device_images=True, workers=2)
    assert without_timings(a.history.rows) == without_timings(b.history.rows)
    assert b.config["options"]["workers"] == 0  # what the run actually used


def test_every_process_follows_process_0_when_it_trains_uncached(tiny_data, tiny_backbone, tmp_path, monkeypatch):
    """Under torchrun, process 0 may fall back to training uncached (no disk room) while another
    process, checking a moment later, finds room: the processes would then compute different
    floats. Every process takes process 0's 'off' (tl.engine.distributed.from_main stands in for the
    broadcast here), so this process trains exactly like an uncached run."""
    from tl.engine import distributed

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
    assert without_timings(follower.history.rows) == without_timings(uncached.history.rows)
    for name, tensor in uncached.model.state_dict().items():
        assert torch.equal(tensor, follower.model.state_dict()[name]), name
