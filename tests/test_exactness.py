"""Exactness: a resumed run equals an uninterrupted one, in every combination of the
features that share state (feature cache, augmentation and cached views, workers,
--quick, early stopping, a second resume), and stored state is never trusted blindly.

The frozen recipe starts from a weights *file* (not a seeded random init), so a resume
that built or cached from the wrong backbone weights would show in the numbers.
"""

from __future__ import annotations

import json
import os
import shutil
import stat

import pandas as pd
import pytest
import torch

import main
import tl.engine.run
from tests.conftest import TinyNet, write_image_folder
from tl import TLError, features
from tl.engine import checkpoint, feature_store, files
from tl.engine.feature_store import FeaturePass
from tl.models import get_backbone

pytestmark = pytest.mark.usefixtures("own_cache_dir")  # every test: a feature-cache folder of its own


def _train(data, out, epochs, *extra, weights=None, code=0):
    argv = ["-e", "resnet_frozen", "-b", "tiny", "--data", str(data), "--out", str(out), "--epochs", str(epochs),
            "--lr-scale", "20", "--batch-size", "5", "--no-progress", *extra]
    if weights is not None:
        argv += ["--weights", str(weights)]
    assert main.main(argv) == code
    (run_dir,) = out.iterdir()
    return run_dir


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in rows]


def _assert_same_run(a, b):
    ca, cb = checkpoint.load_checkpoint(a / "last.ckpt"), checkpoint.load_checkpoint(b / "last.ckpt")
    assert ca["epoch"] == cb["epoch"]
    assert _strip(ca["history"]["rows"]) == _strip(cb["history"]["rows"])
    assert ca["history"]["stopped_early"] == cb["history"]["stopped_early"]
    for name, tensor in ca["model"].items():
        assert torch.equal(tensor, cb["model"][name]), name
    best_a, best_b = checkpoint.load_state_file(a / "best.pth"), checkpoint.load_state_file(b / "best.pth")
    assert all(torch.equal(t, best_b[k]) for k, t in best_a.items())
    ra = json.loads((a / "config.json").read_text())["results"]
    rb = json.loads((b / "config.json").read_text())["results"]
    for key in ("best_val_acc", "best_epoch", "final_val_acc", "final_val_loss", "baseline_val_acc"):
        assert ra[key] == rb[key], key
    assert pd.read_csv(a / "history.csv").drop(columns=["seconds", "images_per_s"]).equals(
        pd.read_csv(b / "history.csv").drop(columns=["seconds", "images_per_s"]))
    for run_dir in (a, b):
        _assert_recorded_digests_match(run_dir)


def _assert_recorded_digests_match(run_dir):
    """Every weight file the run recorded in config.json is the file on disk (what --evaluate checks)."""
    checksums = json.loads((run_dir / "config.json").read_text())["checksums"]
    assert "best.pth" in checksums
    for name, digest in checksums.items():
        assert files.state_digest(checkpoint.load_state_file(run_dir / name)) == digest, (run_dir, name)


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


@pytest.mark.parametrize("extra", COMBINATIONS.values(), ids=COMBINATIONS.keys())
def test_resume_equals_an_uninterrupted_run(tiny_data, pretrained, tmp_path, extra):
    full = _train(tiny_data, tmp_path / "full", 4, *extra, weights=pretrained)
    half = _train(tiny_data, tmp_path / "half", 2, *extra, weights=pretrained)
    stopped = checkpoint.load_checkpoint(half / "last.ckpt")["history"]["stopped_early"]
    # the printed command: --resume alone restores every option (workers, quick, cache, ...)
    code = main.main(["--resume", str(half / "last.ckpt"), "--epochs", "4", "--no-progress"])
    assert code == (2 if stopped is not None else 0)
    if stopped is None:
        _assert_same_run(full, half)
    else:  # stopped early before the cut: the uninterrupted run stopped at the same epoch
        assert checkpoint.load_checkpoint(full / "last.ckpt")["history"]["stopped_early"] == stopped


def test_a_second_resume_after_an_interrupted_one(tiny_data, pretrained, tmp_path, monkeypatch):
    full = _train(tiny_data, tmp_path / "full", 4, "--no-augment", weights=pretrained)
    half = _train(tiny_data, tmp_path / "half", 1, "--no-augment", weights=pretrained)
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
    _assert_same_run(full, half)
    config = json.loads((half / "config.json").read_text())
    assert config["train_epochs"] == 4 and config["options"]["epochs"] == 4
    assert [r["after_epoch"] for r in config["resumed"]] == [1, 2]
    assert not list(half.glob(".*.tmp"))


def test_resume_restores_the_backbone_before_caching(tiny_data, pretrained, tmp_path, own_cache_dir):
    """The issue's first finding: the cache must be computed from the restored weights.
    The resumed run finds exactly the cache files the first run made (same key, same
    weights) and adds none."""
    half = _train(tiny_data, tmp_path / "half", 1, "--no-augment", weights=pretrained)
    before = sorted(own_cache_dir.iterdir())
    assert main.main(["--resume", str(half / "last.ckpt"), "--epochs", "2", "--no-progress"]) == 0
    assert sorted(own_cache_dir.iterdir()) == before


def test_options_that_change_the_result_are_refused_on_resume(tiny_data, pretrained, tmp_path, capsys):
    half = _train(tiny_data, tmp_path / "half", 1, "--workers", "0", weights=pretrained)
    ckpt = str(half / "last.ckpt")
    for bad in (["--workers", "2"], ["--no-feature-cache"], ["--lr-scale", "3"], ["--no-augment"], ["--seed", "1"],
                ["--batch-size", "7"]):
        assert main.main(["--resume", ckpt, "--no-progress", *bad]) == 2, bad
        err = capsys.readouterr().err
        option = bad[0].removeprefix("--").removeprefix("no-")
        assert "would change its result" in err and option in err and "Traceback" not in err
    # the safe ones apply and are recorded; the run's numbers describe the whole run
    assert main.main(["--resume", ckpt, "--epochs", "2", "--device", "cpu", "--no-progress", "--workers", "0"]) == 0
    config = json.loads((half / "config.json").read_text())
    assert config["options"]["epochs"] == 2 and config["options"]["device"] == "cpu"
    assert config["results"]["wall_seconds"] > checkpoint.load_checkpoint(half / "last.ckpt")["wall_seconds"] / 2
    assert len(pd.read_csv(half / "history.csv")) == 5  # val 0, train+val 1, train+val 2


def test_resume_checks_the_data_not_only_the_class_names(tiny_data, pretrained, tmp_path, capsys):
    half = _train(tiny_data, tmp_path / "half", 1, weights=pretrained)
    other = write_image_folder(tmp_path / "other", seed=5)  # same class names, other images
    assert main.main(["--resume", str(half / "last.ckpt"), "--data", str(other), "--epochs", "2"]) == 2
    assert "other images" in capsys.readouterr().err
    moved = shutil.copytree(tiny_data, tmp_path / "moved")  # the same images in another place
    assert main.main(["--resume", str(half / "last.ckpt"), "--data", str(moved), "--epochs", "2",
                      "--no-progress"]) == 0
    assert json.loads((half / "config.json").read_text())["options"]["data"] == str(moved)


def test_a_damaged_checkpoint_is_refused(tiny_data, pretrained, tmp_path, capsys):
    run_dir = _train(tiny_data, tmp_path / "runs", 1, weights=pretrained)
    ckpt_path = run_dir / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["model"]["fc.weight"].view(torch.int32)[0, 0] ^= 1  # one flipped mantissa bit, digest kept
    torch.save(ckpt, ckpt_path)
    for argv in (["--resume", str(ckpt_path)], ["--evaluate", str(ckpt_path), "--data", str(tiny_data)]):
        assert main.main(argv) == 2
        err = capsys.readouterr().err
        assert "is damaged" in err and "Traceback" not in err
    best = run_dir / "best.pth"
    state = torch.load(best, weights_only=True)
    state["stem.0.weight"].view(torch.int32)[0, 0, 0, 0] ^= 1
    torch.save(state, best)
    assert main.main(["--evaluate", str(best), "--data", str(tiny_data)]) == 2
    assert "damaged or was replaced" in capsys.readouterr().err


def test_flipped_bytes_anywhere_in_a_checkpoint_never_load_silently(tiny_data, pretrained, tmp_path, capsys):
    run_dir = _train(tiny_data, tmp_path / "runs", 1, weights=pretrained)
    data = bytearray((run_dir / "last.ckpt").read_bytes())
    generator = torch.Generator().manual_seed(0)
    for i in torch.randint(len(data), (50,), generator=generator).tolist():
        data[i] ^= 0xFF
    (run_dir / "last.ckpt").write_bytes(bytes(data))
    assert main.main(["--resume", str(run_dir / "last.ckpt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err


def test_the_grad_scaler_state_is_saved_and_restored(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    path = checkpoint.save_checkpoint(tmp_path / "last.ckpt", epoch=1, model=model, optimizer=optimizer,
                                      scheduler=None, scaler=scaler, history={}, config={}, classes=["a"],
                                      loader_generator=None, wall_seconds=1.0)
    saved = checkpoint.load_checkpoint(path)["scaler"]
    fresh = torch.amp.GradScaler("cpu")
    fresh.load_state_dict(saved)
    assert fresh.get_scale() == 1024.0 and fresh.get_growth_interval() == 7


# ----------------------------------------------------------------------------- run folders
def test_two_runs_in_the_same_second_get_their_own_folders(tiny_data, tiny_backbone, tmp_path, monkeypatch):
    monkeypatch.setattr(tl.engine.run_folder.time, "strftime", lambda *a: "20260101-000000")
    argv = ["-e", "resnet_frozen", "-b", "tiny", "--data", str(tiny_data), "--out", str(tmp_path / "runs"),
            "--epochs", "1", "--no-progress", "--weights", "none"]
    assert main.main(argv) == 0 and main.main(argv) == 0
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert folders == ["resnet_frozen-tiny-20260101-000000", "resnet_frozen-tiny-20260101-000000-2"]
    assert all((tmp_path / "runs" / f / "last.ckpt").is_file() for f in folders)
    with pytest.raises(TLError, match="already exists"):
        tl.engine.run_folder.make_run_dir(tmp_path / "runs", folders[0], explicit=True)


def test_run_folder_files_share_one_mode_and_stale_temporaries_go(tiny_data, pretrained, tmp_path):
    run_dir = _train(tiny_data, tmp_path / "runs", 1, "--save-every-epoch", weights=pretrained)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in run_dir.iterdir()}
    assert len(set(modes.values())) == 1, modes
    (run_dir / ".last.ckpt.abc123.tmp").write_bytes(b"half a save")  # a save killed mid-write
    assert main.main(["--resume", str(run_dir / "last.ckpt"), "--epochs", "2", "--no-progress"]) == 0
    assert not list(run_dir.glob(".*.tmp"))


def test_a_failed_start_leaves_no_run_folder(tiny_data, tiny_backbone, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise TLError("the loop could not start")

    monkeypatch.setattr(tl.engine.run, "train_model", fail)
    assert main.main(["-e", "resnet_frozen", "-b", "tiny", "--data", str(tiny_data), "--out",
                      str(tmp_path / "runs"), "--weights", "none", "--no-progress"]) == 2
    assert not any((tmp_path / "runs").iterdir())


# ----------------------------------------------------------------------------- the feature cache
class Noisy(torch.nn.Module):
    """A module no list of module types knows: adds noise in train mode only."""

    def forward(self, x):
        return x + torch.randn_like(x) if self.training else x


def _frozen_tiny(prefix_extra: torch.nn.Module | None = None):
    from tl.models import set_trainable

    net = TinyNet()
    if prefix_extra is not None:
        net.block.append(prefix_extra)
    set_trainable(net, get_backbone("tiny"), ["head"])
    return net


@pytest.mark.parametrize("module, cacheable", [
    (None, True), (torch.nn.Dropout(0.0), True), (torch.nn.Identity(), True),
    (torch.nn.Dropout2d(0.2), False), (torch.nn.AlphaDropout(0.2), False), (Noisy(), False),
])
def test_cacheability_is_tried_not_looked_up(tiny_backbone, module, cacheable):
    from torchvision.ops import StochasticDepth  # noqa: F401  (torchvision's efficientnet_b0 uses it)

    net = _frozen_tiny(module)
    split = features.split_at_cut(net, get_backbone("tiny"))
    probe = torch.randn(4, 3, 32, 32)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    reason = features.why_not_cacheable(net, split, frozen_bn_eval=True, probe=probe)
    assert (reason is None) == cacheable, reason
    assert torch.equal(torch.get_rng_state(), rng)  # the probe draws nothing from the run's RNG
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert net.training  # mode restored


def test_batchnorm_in_train_mode_and_stochastic_depth_are_not_cached(tiny_backbone):
    from torchvision.ops import StochasticDepth

    net = _frozen_tiny()
    split = features.split_at_cut(net, get_backbone("tiny"))
    probe = torch.randn(4, 3, 32, 32)
    reason = features.why_not_cacheable(net, split, frozen_bn_eval=False, probe=probe)
    assert reason is not None and "running_mean" in reason
    assert all(torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean)) for bn in (net.stem[1], net.block[1]))
    net = _frozen_tiny(StochasticDepth(0.5, "row"))
    assert features.why_not_cacheable(net, split, frozen_bn_eval=True, probe=probe) is not None


def test_torchvision_efficientnet_with_stochastic_depth_trains_uncached(tiny_data, tmp_path):
    from experiments.recipes import resnet_frozen
    from tl.engine.options import RunOptions
    from tl.engine.run import run

    opts = RunOptions(data=tiny_data, backbone="efficientnet_b0", weights="none", epochs=1, workers=0,
                      out=tmp_path, image_size=32, progress=False, plots=False)
    result = run(resnet_frozen.RECIPE, resnet_frozen.build, opts, log=lambda s: None)
    assert result.config["feature_cache"].startswith("off (the layers before classifier compute something else")


class _FakeSet:
    def __init__(self, samples, transform="T"):
        self.samples, self.transform = samples, transform


def test_the_cache_key_holds_what_changes_the_numbers_and_nothing_else(tiny_data, tiny_backbone):
    files = sorted(str(p) for p in (tiny_data / "val").rglob("*.png"))
    ds = _FakeSet([(f, 0) for f in files])
    net = _frozen_tiny()
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
    assert _strip(first.history.rows) == _strip(second.history.rows)
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


def test_evaluating_a_run_file_checks_its_recorded_digest(tiny_data, pretrained, tmp_path, capsys):
    run_dir = _train(tiny_data, tmp_path / "runs", 2, "--save-every-epoch", weights=pretrained)
    config = json.loads((run_dir / "config.json").read_text())
    assert set(config["checksums"]) == {"best.pth", "00.pth", "01.pth", "02.pth"}
    best = config["results"]["best_epoch"]
    assert config["checksums"]["best.pth"] == config["checksums"][f"{best:02d}.pth"]
    os.replace(run_dir / "00.pth", run_dir / "best.pth") if best != 0 else os.replace(run_dir / "01.pth",
                                                                                      run_dir / "best.pth")
    assert main.main(["--evaluate", str(run_dir / "best.pth"), "--data", str(tiny_data)]) == 2
    assert "damaged or was replaced" in capsys.readouterr().err


def test_a_killed_writers_temporary_files_go_and_a_live_ones_stay(tmp_path):
    dead = tmp_path / ".x.pt.999999999.abc.tmp"  # no such process
    live = tmp_path / f".x.pt.{os.getpid()}.abc.tmp"  # a save in progress in this process
    dead.write_bytes(b"half"), live.write_bytes(b"half")
    assert files.remove_stale_temporaries(tmp_path) == [dead]
    assert live.exists() and not dead.exists()


def test_best_pth_stays_valid_when_a_resumed_run_finds_no_new_best(tiny_data, pretrained, tmp_path, capsys):
    """The review's case: the checkpoint of the best epoch must already carry best.pth's digest,
    or a resume that finds no better epoch leaves config.json naming the previous best's."""
    half = _train(tiny_data, tmp_path / "half", 2, "--save-every-epoch", "--monitor", "loss", weights=pretrained)
    config = json.loads((half / "config.json").read_text())
    ckpt = checkpoint.load_checkpoint(half / "last.ckpt")
    assert ckpt["config"]["checksums"] == config["checksums"]  # the checkpoint knows this epoch's files
    (half / "best.pth").unlink(), (half / "02.pth").unlink()  # killed right after last.ckpt was written
    assert main.main(["--resume", str(half / "last.ckpt"), "--epochs", "3", "--no-progress"]) == 0
    _assert_recorded_digests_match(half)
    assert main.main(["--evaluate", str(half / "best.pth"), "--data", str(tiny_data)]) == 0
    capsys.readouterr()
