"""`python main.py -e NAME`, a training run through the command line: what it reports (classes,
data set sizes, skipped files, the headline), the run folder it writes, and bad input, which never
corrupts labels, deletes files or shows a traceback.

Each test builds its input itself (small synthetic images in tmp_path) and checks the exact
outcome: the classes and data set sizes a run reports, the files left on disk, the exit status,
and that no output holds a traceback. Exit status 2 means "your input or your machine": one
message that names the thing and what to do; 130 means Ctrl-C."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from PIL import Image
from torch import nn

import main
import tl.engine.run
from tests.conftest import TinyNet, write_image_folder
from tests.helpers import (
    class_folders_only,
    cli,
    cli_exit,
    picture,
    png_size,
    train_frozen,
    train_one_epoch,
    train_quick,
    train_three_epochs,
)
from tl import TLError
from tl.data import build_transforms
from tl.engine import balance, feature_store, images, metrics, run_folder, selection
from tl.engine.checkpoint import load_checkpoint
from tl.engine.options import RunOptions
from tl.engine.selection import image_datasets, nested_draw
from tl.models import BACKBONES, Backbone

MEAN = STD = (0.5, 0.5, 0.5)




def run_config(out: Path) -> dict:
    (run_dir,) = out.iterdir()
    return json.loads((run_dir / "config.json").read_text())


def truncated_jpeg(path: Path) -> Path:
    pixels = np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "JPEG", quality=95)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # header intact, second half of the picture gone
    return path


# ----------------------------------------------------------------------------- a run and the folder it writes
def test_quick_run_writes_config_and_history(tiny_data, tiny_backbone, tmp_path, capsys):
    assert main.main(["-e", "resnet_scratch", "-b", "tiny", "--data", str(tiny_data), "--quick",
                      "--out", str(tmp_path / "runs"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("resnet_scratch-tiny-")
    last = out.strip().splitlines()[-1]
    assert last.startswith("headline acc") and "(val, final epoch)" in last and "best val acc" in last
    assert str(run_dir) in out
    config = json.loads((run_dir / "config.json").read_text())
    assert config["recipe"]["lrs"] == {"all": 1e-4} and config["results"]["best_epoch"] >= 0
    history = pd.read_csv(run_dir / "history.csv")
    assert list(history.phase) == ["val", "train", "val"]
    assert {"best.pth", "last.ckpt"} <= {p.name for p in run_dir.iterdir()}


@pytest.mark.slow
def test_frozen_efficientnet_on_hymenoptera_reaches_85_percent(hymenoptera, tmp_path, capsys):
    """End to end on real photos, through main.py: 2 training epochs of the frozen recipe."""
    code = main.main(["-e", "resnet_frozen", "--backbone", "efficientnet_lite0", "--data", str(hymenoptera),
                      "--epochs", "2", "--workers", "0", "--out", str(tmp_path / "runs"), "--no-progress"])
    assert code == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    results = json.loads((run_dir / "config.json").read_text())["results"]
    assert results["baseline_val_acc"] < 0.75  # the random head knows nothing yet
    assert results["best_val_acc"] >= 0.85
    assert "skipped" not in capsys.readouterr().out  # hymenoptera's .gif is simply not an image file


def test_every_run_folder_gets_its_pictures(tiny_data, tiny_backbone, tmp_path):
    assert main.main(["-e", "resnet_scratch", "-b", "tiny", "--data", str(tiny_data), "--quick",
                      "--out", str(tmp_path / "runs"), "--no-progress"]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    for name in ("curves.png", "confusion.png", "predictions.png", "top_losses.png"):
        png_size(run_dir / name)


def test_every_run_folder_gets_top_losses(quick_run):
    with Image.open(quick_run / "top_losses.png") as img:
        assert img.format == "PNG" and img.width >= 300


def test_every_run_folder_and_every_evaluate_get_a_classification_report(tmp_path, tiny_backbone, capsys):
    data = write_image_folder(tmp_path / "data", train=8, val=4, phases=("train", "val", "test"))
    run_dir = train_quick(data, tmp_path / "runs", "--save-every-epoch")
    headline = json.loads((run_dir / "config.json").read_text())["results"]
    predictions = pd.read_csv(run_dir / "headline_predictions.csv")
    table = pd.read_csv(run_dir / "classification_report.csv").set_index("class")
    assert table.loc["accuracy", "f1"] == pytest.approx(headline["headline_acc"])  # the headline model, on test
    assert table.loc[["class_0", "class_1"], "support"].tolist() == [4, 4]
    expected = metrics.classification_report(predictions.label, predictions.prediction, predictions.path,
                                             ["class_0", "class_1"])
    assert table.loc["macro average", "f1"] == pytest.approx(expected["macro_f1"])
    assert "macro-F1" in capsys.readouterr().out and (run_dir / "confused_pairs.csv").is_file()
    assert "Classification report" in (run_dir / "classification_report.md").read_text()

    assert main.main(["--evaluate", str(run_dir / "best.pth"), "--split", "val"]) == 0
    out = capsys.readouterr().out
    accuracy = float(out.split("accuracy ")[1].split()[0])
    report = pd.read_csv(run_dir / "evaluate-best-val" / "classification_report.csv").set_index("class")
    assert report.loc["accuracy", "f1"] == pytest.approx(accuracy, abs=1e-4)
    assert report.loc[["class_0", "class_1"], "support"].tolist() == [4, 4]  # val's images, not test's
    assert f"-> {run_dir / 'evaluate-best-val' / 'classification_report.md'}" in out
    assert main.main(["--evaluate", str(run_dir), "--split", "test"]) == 0  # every epoch file: the final one's
    final = pd.read_csv(run_dir / "evaluate-01-test" / "classification_report.csv").set_index("class")
    assert final.loc["accuracy", "f1"] == pytest.approx(pd.read_csv(run_dir / "eval_test.csv").acc.iloc[-1])


def test_train_per_class_trains_on_the_draw_and_leaves_val_alone(tiny_data, tiny_backbone, tmp_path):
    run_dir = train_three_epochs(tiny_data, tmp_path / "runs", "tiny", "resnet_scratch", "--train-per-class", "3",
                     "--max-per-class", "100")
    config = json.loads((run_dir / "config.json").read_text())
    assert config["dataset_sizes"] == {"train": 6, "val": 12}
    assert config["options"]["train_per_class"] == 3
    # --evaluate --split train scores the images the run trained on, not the whole train folder
    from tl.engine.evaluate import split_loader
    from tl.engine.model_loading import context_for

    loader, _ = split_loader(tiny_data, "train", context_for(run_dir / "best.pth", None), log=lambda s: None)
    full = image_datasets(tiny_data, build_transforms((0.5,) * 3, (0.5,) * 3, size=32))["train"]
    assert loader.dataset.samples == nested_draw(full.samples, full.classes, 3, seed=0)


@pytest.mark.usefixtures("own_cache_dir")
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


@pytest.mark.usefixtures("own_cache_dir")
def test_run_folder_files_share_one_mode_and_stale_temporaries_go(tiny_data, pretrained, tmp_path):
    run_dir = train_frozen(tiny_data, tmp_path / "runs", 1, "--save-every-epoch", weights=pretrained)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in run_dir.iterdir()}
    assert len(set(modes.values())) == 1, modes
    (run_dir / ".last.ckpt.999999999.0123abcd.tmp").write_bytes(b"half a save")  # a save killed mid-write
    assert main.main(["--resume", str(run_dir / "last.ckpt"), "--epochs", "2", "--no-progress"]) == 0
    assert not list(run_dir.glob(".*.tmp"))


@pytest.mark.usefixtures("own_cache_dir")
def test_a_failed_start_leaves_no_run_folder(tiny_data, tiny_backbone, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise TLError("the loop could not start")

    monkeypatch.setattr(tl.engine.run, "train_model", fail)
    assert main.main(["-e", "resnet_frozen", "-b", "tiny", "--data", str(tiny_data), "--out",
                      str(tmp_path / "runs"), "--weights", "none", "--no-progress"]) == 2
    assert not (tmp_path / "runs").exists()  # neither a run folder nor the --out the command made for it


# ----------------------------------------------------------------------------- classes and images
def test_hidden_and_system_folders_are_never_classes(tmp_path, tiny_backbone, capsys):
    d = write_image_folder(tmp_path / "d")
    for folder in (d / "train" / ".thumbs", d / "train" / "__MACOSX", d / "train" / "class_0" / ".cache"):
        folder.mkdir()
        picture(folder / "x.png")
    (d / "val" / ".ipynb_checkpoints").mkdir()  # empty: no class either, and no message about it
    code, out, _ = train_one_epoch(capsys, d, tmp_path / "runs")
    assert code == 0
    config = run_config(tmp_path / "runs")
    assert config["classes"] == ["class_0", "class_1"]
    assert config["dataset_sizes"] == {"train": 24, "val": 12}
    assert "ignored 4 folder(s) that are not classes" in out and ".thumbs" in out
    # --evaluate and --show-data read the same definition
    (run_dir,) = (tmp_path / "runs").iterdir()
    code, out, _ = cli_exit(capsys, "--evaluate", run_dir / "best.pth", "--data", d)
    assert code == 0 and "(12 images)" in out and "ignored 1 folder(s)" in out
    code, out, _ = cli_exit(capsys, "--show-data", "--data", d, "--backbone", "tiny", "--out", tmp_path / "show")
    assert code == 0 and "ignored 4 folder(s)" in out


def test_a_link_to_the_parent_folder_neither_loops_nor_relabels(tmp_path, tiny_backbone, capsys):
    d = write_image_folder(tmp_path / "d")
    (d / "train" / "class_1" / "up").symlink_to("..")  # train/class_1/up -> train/: ants-in-bees, and a loop
    elsewhere = write_image_folder(tmp_path / "elsewhere", phases=("val",)) / "val" / "class_1"
    for f in (d / "val" / "class_1").iterdir():
        f.unlink()
    (d / "val" / "class_1").rmdir()
    (d / "val" / "class_1").symlink_to(elsewhere)  # a class folder that is a link to another disk
    code, _, err = train_one_epoch(capsys, d, tmp_path / "refused")
    # its files leave the data folder: left out by default, so the class is empty, and the message says why
    assert code == 2 and "no usable image in class folder(s) ['class_1']" in err and "--follow-links" in err
    assert f"leads to {elsewhere.resolve() / '000.png'}" in err
    code, out, _ = train_one_epoch(capsys, d, tmp_path / "runs", "--follow-links")  # followed when asked for
    assert code == 0
    assert run_config(tmp_path / "runs")["dataset_sizes"] == {"train": 24, "val": 12}
    assert "counted 12 file path(s) once" in out
    assert "6 file(s) are reached through links that leave the data folder" in out and "included" in out
    sets = image_datasets(d, build_transforms(MEAN, STD, size=32), follow_links=True)
    for path, target in sets["train"].samples:  # every file keeps the label of the folder that holds it
        assert os.path.realpath(path).split(os.sep)[-2] == sets["train"].classes[target]


def test_a_link_that_leaves_the_data_folder_is_reported_and_left_out(tmp_path, tiny_backbone, capsys):
    d = write_image_folder(tmp_path / "d")
    system = write_image_folder(tmp_path / "usr" / "share", classes=1, phases=("val",), val=5) / "val" / "class_0"
    (d / "val" / "class_0" / "icons").symlink_to(system)  # 5 unrelated pictures would become class_0
    code, out, _ = train_one_epoch(capsys, d, tmp_path / "runs")
    assert code == 0 and run_config(tmp_path / "runs")["dataset_sizes"] == {"train": 24, "val": 12}
    assert "5 file(s) are reached through links that leave the data folder, into " + str(system.resolve()) in out
    assert "left out (pass --follow-links to include them)" in out
    sets = image_datasets(d, build_transforms(MEAN, STD, size=32), follow_links=True)
    assert len(sets["val"]) == 17


def test_a_class_folder_that_links_to_its_parent_gets_no_files(tmp_path, tiny_backbone, capsys):
    d = write_image_folder(tmp_path / "d")
    for phase in ("train", "val"):
        (d / phase / "all").symlink_to(".")  # a "class" holding every other class
        (d / phase / "class_0" / "loop.jpg").symlink_to("loop.jpg")  # a file link to itself
    code, _, err = train_one_epoch(capsys, d, tmp_path / "runs")
    assert code == 2 and "no usable image in class folder(s) ['all']" in err
    sets = images.scan_classes(str(d / "train"), ["all", "class_0", "class_1"])
    assert [t for _, t in sets["samples"]].count(1) == 12 and len(sets["samples"]) == 24
    assert (str(d / "train" / "class_0" / "loop.jpg"), "cannot be read (Too many levels of symbolic links)") \
        in sets["skipped"]


def test_a_file_in_train_and_val_is_refused(tmp_path, tiny_backbone, capsys):
    d = write_image_folder(tmp_path / "d")
    os.link(d / "train" / "class_0" / "000.png", d / "val" / "class_0" / "copy.png")
    code, _, err = train_one_epoch(capsys, d, tmp_path / "runs")
    assert code == 2 and "1 file(s) belong to two splits" in err and "copy.png" in err
    assert not (tmp_path / "runs").exists()


def test_a_folder_of_every_kind_of_bad_file_trains_and_reports_the_skips(tmp_path, tiny_backbone, capsys):
    data = write_image_folder(tmp_path / "messy")
    folder = data / "train" / "class_0"
    rgb = Image.open(folder / "000.png").convert("RGB")
    rgb.convert("L").save(folder / "gray.png")
    rgb.convert("P").save(folder / "palette.png")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    rgb.convert("RGBA").save(folder / "rgba.png")
    Image.fromarray((np.arange(40 * 40).reshape(40, 40) * 30).astype(np.uint16)).save(folder / "sixteen.png")
    rgb.resize((3000, 2000)).save(folder / "huge.jpg")
    rgb.resize((300, 300)).save(folder / "truncated.jpg", quality=95)
    raw = (folder / "truncated.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "html.jpg").write_text("<html>404</html>")
    (folder / "notes.txt").write_text("hello")
    (folder / ".DS_Store").write_bytes(b"\0")
    code = main.main(["-e", "resnet_scratch", "-b", "tiny", "--data", str(data), "--epochs", "1",
                      "--out", str(tmp_path / "runs"), "--no-progress", "--workers", "0"])
    assert code == 0
    out = capsys.readouterr().out
    # the truncated JPEG lacks its end marker, so even the quick scan decodes it and leaves it out
    assert "skipped 3 unusable image file(s)" in out and "empty.jpg: empty file" in out and "html.jpg" in out
    assert "truncated.jpg: OSError: image file is truncated" in out
    capsys.readouterr()
    assert main.main(["-e", "resnet_scratch", "-b", "tiny", "--data", str(data), "--epochs", "1", "--verify-images",
                      "--out", str(tmp_path / "runs2"), "--no-progress", "--workers", "0"]) == 0
    assert "skipped 3 unusable" in capsys.readouterr().out  # the full decode of every file agrees


def test_a_class_with_no_usable_image_stops_with_a_message(tmp_path, tiny_backbone, capsys):
    data = write_image_folder(tmp_path / "d")
    for f in (data / "val" / "class_1").iterdir():
        f.write_bytes(b"")
    assert main.main(["-e", "resnet_scratch", "-b", "tiny", "--data", str(data), "--out", str(tmp_path)]) == 2
    assert "no usable image in class folder(s) ['class_1']" in capsys.readouterr().err


# Names that are not valid UTF-8: a lone byte, Latin-1 "café", and the UTF-8 form of a lone surrogate
# (U+D800), which Python's UTF-8 decoder also refuses. Python holds each as surrogate escapes.
NOT_UTF8 = [b"\xff", b"caf\xe9", b"\xed\xa0\x80"]


def test_photo_names_that_are_not_utf8_train_evaluate_and_predict(tmp_path, tiny_backbone, capsys):
    """A photo's name is only written into tables (escaped there), never matched back: a --val-split run
    (its split drawn again by --evaluate), --evaluate and --predict DIR all read every photo."""
    d = write_image_folder(tmp_path / "d", phases=("train",))
    for k in (0, 1):
        folder = os.fsencode(d / "train" / f"class_{k}")
        for i, name in enumerate(NOT_UTF8):
            os.rename(os.path.join(folder, b"%03d.png" % i), os.path.join(folder, name + b".png"))
    code, _, _ = train_one_epoch(capsys, d / "train", tmp_path / "runs", "--val-split", "0.5")
    assert code == 0 and run_config(tmp_path / "runs")["dataset_sizes"] == {"train": 12, "val": 12}
    (run_dir,) = (tmp_path / "runs").iterdir()
    code, out, _ = cli_exit(capsys, "--evaluate", run_dir / "best.pth")
    assert code == 0 and "(12 images)" in out
    code, _, _ = cli_exit(capsys, "--predict", d, "--checkpoint", run_dir / "best.pth", "--csv", tmp_path / "p.csv",
                          "--workers", "0", "--no-progress")
    assert code == 0 and len(pd.read_csv(tmp_path / "p.csv")) == 24


@pytest.mark.parametrize("phases", [("train", "val"), ("val",), ("split",)])
@pytest.mark.parametrize("name", NOT_UTF8)
def test_a_class_folder_name_that_is_not_utf8_is_refused_by_name(tmp_path, tiny_backbone, capsys, name, phases):
    """A class name must read back from config.json and the tables as the same name: a class folder
    whose name is not UTF-8 is one error line that names its bytes, before any work."""
    d = write_image_folder(tmp_path / "d")
    extra = []
    if phases == ("split",):
        d, phases, extra = d / "train", ("",), ["--val-split", "0.5"]
    for phase in phases:
        os.rename(os.fsencode(d / phase / "class_1"), os.path.join(os.fsencode(d / phase), name))
    code, _, err = train_one_epoch(capsys, d, tmp_path / "runs", *extra)
    assert code == 2 and len(err.strip().splitlines()) == 1 and repr(name) in err and "rename it" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("split", [False, True])
def test_a_data_set_of_one_class_is_refused_before_any_work(tmp_path, tiny_backbone, capsys, split):
    """A classifier of one class has nothing to tell apart (and its config.json could not be read
    back): one error line, no run folder, with a split and with --val-split."""
    d = write_image_folder(tmp_path / "d", classes=1, phases=("train",) if split else ("train", "val"))
    code, _, err = train_one_epoch(capsys, d / "train" if split else d, tmp_path / "runs",
                                   *(["--val-split", "0.5"] if split else []))
    assert code == 2 and len(err.strip().splitlines()) == (1 if split else 2) and "2 or more" in err, err
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- --val-split
def test_val_split_refuses_a_folder_that_is_already_split(tmp_path, tiny_backbone, capsys):
    d = write_image_folder(tmp_path / "d")
    code, _, err = train_one_epoch(capsys, d, tmp_path / "runs", "--val-split", "0.2")
    assert code == 2 and "is already split (train/, val/)" in err and f"--data {d / 'train'}" in err
    assert not (tmp_path / "runs").exists()


def test_val_split_stops_when_a_class_is_too_small(tmp_path, tiny_backbone, capsys):
    d = class_folders_only(tmp_path / "d", {"big": 20, "tiny": 1})
    code, _, err = train_one_epoch(capsys, d, tmp_path / "runs", "--val-split", "0.2")
    assert code == 2 and "tiny (1 usable image(s) -> 0 val, 1 train)" in err
    code, _, err = train_one_epoch(capsys, d, tmp_path / "runs", "--val-split", "0.99")
    assert code == 2 and "big (20 usable image(s) -> 20 val, 0 train)" in err
    for bad in ("1", "1.5", "0", "abc"):
        code, _, err = train_one_epoch(capsys, d, tmp_path / "runs", "--val-split", bad)
        assert code == 2 and "--val-split" in err
    assert not (tmp_path / "runs").exists()


def test_val_split_honours_quick_and_max_per_class(tmp_path, tiny_backbone, capsys):
    d = class_folders_only(tmp_path / "d", {"a": 20, "b": 20})
    code, _, _ = train_one_epoch(capsys, d, tmp_path / "q", "--val-split", "0.25", "--quick")
    assert code == 0
    config = run_config(tmp_path / "q")
    assert config["dataset_sizes"] == {"train": 16, "val": 10}  # 15/5 per class, then at most 8
    assert config["options"]["max_per_class"] == 8
    code, _, _ = train_one_epoch(capsys, d, tmp_path / "m", "--val-split", "0.25", "--max-per-class", "3")
    assert code == 0 and run_config(tmp_path / "m")["dataset_sizes"] == {"train": 6, "val": 6}


def test_val_split_has_its_own_seed(tmp_path, tiny_backbone, capsys, monkeypatch):
    d = class_folders_only(tmp_path / "d", {"a": 12, "b": 12})
    seen = []
    real = selection.split_datasets

    def spy(*args, **kwargs):
        sets = real(*args, **kwargs)
        seen.append([p for p, _ in sets["val"].samples])
        return sets

    monkeypatch.setattr("tl.engine.selection.split_datasets", spy)
    for n, extra in enumerate((["--seed", "1"], ["--seed", "2"], ["--seed", "1", "--split-seed", "7"])):
        assert train_one_epoch(capsys, d, tmp_path / f"r{n}", "--val-split", "0.25", *extra)[0] == 0
    assert seen[0] == seen[1]  # another training seed, the same val images
    assert seen[0] != seen[2] and len(seen[2]) == 6
    assert run_config(tmp_path / "r2")["options"]["split_seed"] == 7


def test_val_split_on_a_folder_of_class_folders(tmp_path, tiny_backbone, capsys):
    data = write_image_folder(tmp_path / "d", train=20, phases=("train",)) / "train"
    assert main.main(["-e", "resnet_scratch", "-b", "tiny", "--data", str(data), "--out", str(tmp_path / "r")]) == 2
    assert "--val-split" in capsys.readouterr().err
    for out in ("r1", "r2"):
        assert main.main(["-e", "resnet_scratch", "-b", "tiny", "--data", str(data), "--val-split", "0.25",
                          "--epochs", "1", "--out", str(tmp_path / out), "--no-progress", "--workers", "0"]) == 0
    configs = [json.loads(next((tmp_path / o).iterdir()).joinpath("config.json").read_text()) for o in ("r1", "r2")]
    assert configs[0]["dataset_sizes"] == {"train": 30, "val": 10}
    assert configs[0]["results"]["best_val_acc"] == configs[1]["results"]["best_val_acc"]


# ----------------------------------------------------------------------------- broken images
def test_a_truncated_jpeg_is_skipped_alike_by_every_path(tmp_path, tiny_backbone, capsys):
    d = write_image_folder(tmp_path / "d")
    truncated_jpeg(d / "train" / "class_1" / "cut.jpg")
    truncated_jpeg(d / "val" / "class_0" / "cut.jpg")
    histories = {}
    for name, extra in (("cached", []), ("uncached", ["--no-feature-cache"]), ("images", ["--image-cache"])):
        code, out, _ = train_one_epoch(capsys, d, tmp_path / name, "--weights", "none", "--no-augment", "--epochs", "2",
                             *extra, experiment="resnet_frozen")
        assert code == 0 and "skipped 2 unusable image file(s)" in out and "cut.jpg: OSError" in out
        config = run_config(tmp_path / name)
        assert config["dataset_sizes"] == {"train": 24, "val": 12}
        history = pd.read_csv(next((tmp_path / name).iterdir()) / "history.csv")
        histories[name] = [(r.epoch, r.phase, r.acc, round(r.loss, 5)) for r in history.itertuples()]
    assert run_config(tmp_path / "cached")["feature_cache"] == "train + val (exact: no augmentation)"
    assert histories["cached"] == histories["uncached"] == histories["images"]
    (run_dir,) = (tmp_path / "cached").iterdir()
    code, out, _ = cli_exit(capsys, "--evaluate", run_dir / "best.pth", "--data", d)
    assert code == 0 and "(12 images)" in out and "skipped 1 unusable" in out and "cut.jpg" in out


def test_a_file_the_quick_scan_misses_stops_the_run_by_name(tmp_path, tiny_backbone, capsys, monkeypatch):
    d = write_image_folder(tmp_path / "d")
    cut = truncated_jpeg(d / "train" / "class_1" / "cut.jpg")
    real = images.check_image
    # stand-in for damage the end-marker test cannot see: the quick scan passes the file
    monkeypatch.setattr(images, "check_image", lambda path, verify=False: real(path, True) if verify else None)
    code, _, err = train_one_epoch(capsys, d, tmp_path / "runs", "--workers", "2")  # the error crosses a worker process
    assert code == 2
    assert err.startswith(f"error: cannot decode {cut} (OSError: image file is truncated") and "--verify-images" in err
    code, out, _ = train_one_epoch(capsys, d, tmp_path / "verified", "--verify-images")
    assert code == 0 and "cut.jpg: OSError: image file is truncated" in out
    assert run_config(tmp_path / "verified")["dataset_sizes"] == {"train": 24, "val": 12}


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(tmp_path, tiny_backbone, capsys, monkeypatch):
    d = write_image_folder(tmp_path / "d")
    truncated_jpeg(d / "train" / "class_1" / "cut.jpg")
    monkeypatch.setattr(images, "check_image", lambda path, verify=False: None)  # the scan misses it
    assert train_one_epoch(capsys, d, tmp_path / "runs")[0] == 2
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_damaged_feature_cache_file_is_rebuilt(tiny_data, tiny_backbone, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TL_CACHE_DIR", str(tmp_path / "cache"))
    frozen = ["--weights", "none", "--no-augment"]
    assert train_one_epoch(capsys, tiny_data, tmp_path / "a", *frozen, experiment="resnet_frozen")[0] == 0
    for stored in (tmp_path / "cache").iterdir():
        stored.write_bytes(b"")  # an interrupted write, a full disk, a bad sector
    assert train_one_epoch(capsys, tiny_data, tmp_path / "b", *frozen, experiment="resnet_frozen")[0] == 0


# ----------------------------------------------------------------------------- the test split
def test_test_files_shared_with_train_are_refused_before_training(tmp_path, tiny_backbone, capsys):
    d = write_image_folder(tmp_path / "d", phases=("train", "val", "test"))
    for test_file in (d / "test" / "class_0").iterdir():  # the "test" images are training images
        test_file.unlink()
        os.link(d / "train" / "class_0" / test_file.name, test_file)
    code, _, err = train_one_epoch(capsys, d, tmp_path / "runs")
    assert code == 2 and "two splits" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_broken_test_split_stops_the_run_before_it_trains(tmp_path, tiny_backbone, capsys):
    d = write_image_folder(tmp_path / "d", phases=("train", "val", "test"))
    for f in (d / "test" / "class_1").iterdir():
        f.write_bytes(b"not an image")
    code, out, err = train_one_epoch(capsys, d, tmp_path / "runs")
    assert code == 2 and "class_1" in err and "test" in err
    assert "epoch  1" not in out  # nothing trained
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# ----------------------------------------------------------------------------- damaged files
@pytest.mark.parametrize("content", [b"", b"hello, not weights\n"])
def test_an_empty_or_text_file_as_weights_or_checkpoint(trained_run, tiny_data, tmp_path, capsys, content):
    bad = trained_run / "bad.pth"  # beside the run's config.json, so only the file itself is wrong
    bad.write_bytes(content)
    expected = "empty file (0 bytes)" if not content else "is not a PyTorch file"
    for argv in (["-e", "resnet_scratch", "-b", "tiny", "--data", tiny_data, "--weights", bad,
                  "--out", tmp_path / "new"],
                 ["--resume", bad],
                 ["--evaluate", bad, "--data", tiny_data],
                 ["--predict", tiny_data / "val" / "class_0" / "000.png", "--checkpoint", bad]):
        code, _, err = cli_exit(capsys, *argv)
        assert code == 2 and str(bad) in err and expected in err, argv
    assert not (tmp_path / "new").exists()  # no half-made run folder
    # a damaged checkpoint inside a run folder: --evaluate and --predict use the same loader
    code, _, err = cli_exit(capsys, "--resume", trained_run)  # a folder where a file belongs
    assert code == 2 and f"{trained_run} is a folder; pass the weights file inside it" in err
    (trained_run / "best.pth").write_bytes(b"")
    code, _, err = cli_exit(capsys, "--evaluate", trained_run / "best.pth", "--data", tiny_data)
    assert code == 2 and "empty file" in err


def test_weights_of_a_whole_pickled_model_load_with_allow_pickle(tiny_data, tiny_backbone, tmp_path, capsys):
    torch.save(TinyNet(), tmp_path / "whole.pt")  # torch.save(model): the pickled object
    code, _, err = train_one_epoch(capsys, tiny_data, tmp_path / "a", "--weights", tmp_path / "whole.pt")
    assert code == 2 and "--allow-pickle" in err and not (tmp_path / "a").exists()
    code, _, _ = train_one_epoch(capsys, tiny_data, tmp_path / "b", "--weights", tmp_path / "whole.pt",
                                 "--allow-pickle")
    assert code == 0 and run_config(tmp_path / "b")["weights_kind"] == "file"


# ----------------------------------------------------------------------------- the machine and the values
def test_unknown_experiment_is_one_line_and_status_2(capsys, tiny_data):
    assert main.main(["--experiment", "resnet_fancy", "--data", str(tiny_data)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown experiment 'resnet_fancy'") and "Traceback" not in err


def test_missing_data_folder(capsys, tmp_path):
    assert main.main(["-e", "resnet_scratch", "--data", str(tmp_path / "nowhere")]) == 2
    assert "data folder not found" in capsys.readouterr().err


def test_an_unreadable_class_folder(tiny_data, tiny_backbone, tmp_path, capsys, monkeypatch):
    locked = tiny_data / "train" / "class_1"
    if os.geteuid() == 0:  # root reads through chmod 000: make the folder unreadable the way the OS would
        real_scandir = os.scandir

        def scandir(path="."):
            if os.path.realpath(path) == str(locked):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_scandir(path)

        monkeypatch.setattr(os, "scandir", scandir)
    else:
        locked.chmod(0)
    try:
        code, _, err = train_one_epoch(capsys, tiny_data, tmp_path / "runs")
    finally:
        locked.chmod(0o755)
    assert code == 2 and err == f"error: permission denied: {locked}: make it readable (and writable, for " \
                                "outputs) or choose another path\n"
    assert not (tmp_path / "runs").exists()


def test_impossible_outputs_stop_before_any_work(tiny_data, tiny_backbone, tmp_path, capsys, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    code, _, err = train_one_epoch(capsys, tiny_data, tmp_path / "a-file" / "runs")
    assert code == 2 and "is a file, not a folder; choose another --out" in err
    monkeypatch.setenv("TL_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    code, _, err = train_one_epoch(capsys, tiny_data, tmp_path / "runs", experiment="resnet_frozen")
    assert code == 2 and "TL_CACHE_DIR" in err and "--no-feature-cache" in err
    assert not (tmp_path / "runs").exists()
    code, _, err = cli_exit(capsys, "--show-data", "--data", tiny_data, "-b", "tiny", "--out", tmp_path / "a-file")
    assert code == 2 and "is a file, not a folder" in err


def _mount_tmpfs(where: Path, options: str) -> bool:
    where.mkdir()
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                              capture_output=True).returncode == 0
    except OSError:
        return False


def test_a_read_only_out_folder(tiny_data, tiny_backbone, tmp_path, capsys):
    ro = tmp_path / "ro"
    if os.geteuid() != 0:
        ro.mkdir()
        ro.chmod(0o555)
    elif not _mount_tmpfs(ro, "ro,size=64k"):
        pytest.skip("needs a read-only file system (mount) or a user that permissions apply to")
    try:
        code, _, err = train_one_epoch(capsys, tiny_data, ro / "runs")
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True) if os.geteuid() == 0 else ro.chmod(0o755)
    assert code == 2 and f"cannot write in {ro}" in err


def test_a_full_disk(tiny_data, tiny_backbone, tmp_path, capsys):
    full = tmp_path / "full"
    if os.geteuid() != 0 or not _mount_tmpfs(full, "size=32k"):
        pytest.skip("needs a small file system (mount as root) to fill")
    try:
        code, _, err = train_one_epoch(capsys, tiny_data, full / "runs", "--no-feature-cache")
    finally:
        subprocess.run(["umount", str(full)], capture_output=True)
    assert code == 2 and err.startswith("error: no space left on the device") and "another disk" in err


@pytest.mark.parametrize("device, message", [("mps", "Metal (MPS) backend is not available"),
                                             ("meta", "'meta' is not a device this project trains on"),
                                             ("cuda:7", "cuda"), ("tpu", "unknown device")])
def test_devices_that_cannot_train(tiny_data, tiny_backbone, tmp_path, capsys, device, message):
    code, _, err = train_one_epoch(capsys, tiny_data, tmp_path / "runs", "--device", device)
    assert code == 2 and message in err and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("seed", ["99999999999999999999999", "-1", "4294967296", "1.5"])
def test_seeds_out_of_range(tiny_data, tmp_path, capsys, seed):
    code, _, err = train_one_epoch(capsys, tiny_data, tmp_path / "runs", "--seed", seed)
    assert code == 2 and "--seed" in err


@pytest.mark.usefixtures("own_cache_dir")
def test_an_ema_decay_outside_0_1_is_one_error_line(capsys, tmp_path):
    for bad in ("1", "0", "-0.5", "1.5", "nan"):
        assert main.main(["-e", "resnet_scratch", "-b", "efficientnet_lite0", "--ema", bad, "--data",
                          str(tmp_path / "nowhere")]) == 2
        out, err = capsys.readouterr()
        assert err.count("\n") == 1 and err.startswith(f"error: --ema {float(bad)}: ") and "between 0 and 1" in err


def test_balancing_options_refuse_what_they_cannot_mean(tmp_path, tiny_backbone, capsys):
    with pytest.raises(SystemExit) as info:
        main.main(["-e", "resnet_scratch", "--data", str(tmp_path), "--class-weights", "inverse"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and [line for line in err.splitlines() if "error:" in line] == [
        "main.py: error: argument --class-weights: the one choice is 'auto' (inverse class frequency), got 'inverse'"]
    with pytest.raises(TLError, match="--class-weights takes 'auto'"):  # the same through the API
        balance.balance(RunOptions(data=tmp_path, class_weights="inverse"), [0, 1], ["a", "b"])
    one_class = write_image_folder(tmp_path / "one", classes=1)
    for option in (["--balanced-sampler"], ["--class-weights", "auto"]):
        assert main.main(["-e", "resnet_scratch", "-b", "tiny", "--data", str(one_class), "--quick",
                          "--out", str(tmp_path / "runs"), *option]) == 2
        err = capsys.readouterr().err  # one class is refused with or without balancing, by the layout check
        assert err.startswith(f"error: {one_class / 'train'} has 1 class folder(s)") and "2 or more" in err, err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing half-made


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_data, tiny_backbone, tmp_path, capsys):
    code = main.main(["-e", "resnet_scratch", "-b", "tiny", "--data", str(tiny_data), "--epochs", "3",
                      "--lr-scale", "1e30", "--out", str(tmp_path / "runs"), "--no-progress", "--workers", "0"])
    assert code == 2
    assert "loss became" in capsys.readouterr().err
    (run_dir,) = (tmp_path / "runs").iterdir()
    ckpt = load_checkpoint(run_dir / "last.ckpt")
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())


# ----------------------------------------------------------------------------- offline
def test_offline_torchvision_backbone_stops_before_training(capsys, tiny_data, tmp_path):
    code = main.main(["-e", "vgg_finetune", "--data", str(tiny_data), "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2
    assert "ImageNet weights for vgg16 are not available" in err and "vgg16-397923af.pth" in err
    assert "--backbone efficientnet_lite0" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing was started


def _failing_download(calls):
    def download(url, download_root, **kwargs):  # what an offline torchvision download leaves behind
        calls.append(url)
        Path(download_root).mkdir(parents=True, exist_ok=True)
        (Path(download_root) / "hymenoptera_data.zip").write_bytes(b"partial")
        raise OSError("network access is blocked in tests")
    return download


def test_first_readme_command_offline_stops_on_weights_before_data(capsys, tmp_path, monkeypatch):
    # `python main.py --experiment vgg_finetune` with no data and no network
    calls = []
    monkeypatch.setattr("torchvision.datasets.utils.download_and_extract_archive", _failing_download(calls))
    monkeypatch.chdir(tmp_path)
    assert main.main(["--experiment", "vgg_finetune"]) == 2
    err = capsys.readouterr().err
    assert "ImageNet weights for vgg16 are not available" in err and "Traceback" not in err
    assert calls == [] and not (tmp_path / "data").exists()  # no data download was tried


def test_a_failed_data_download_leaves_no_empty_data_folder(capsys, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("torchvision.datasets.utils.download_and_extract_archive", _failing_download(calls))
    monkeypatch.chdir(tmp_path)
    assert main.main(["--experiment", "resnet_scratch"]) == 2  # random init: no weights needed, so data fails
    assert "could not be downloaded" in capsys.readouterr().err and len(calls) == 1
    assert not (tmp_path / "data").exists()
    (tmp_path / "data").mkdir()  # a data/ the user made stays, only the partial archive goes
    (tmp_path / "data" / "mine.txt").write_text("keep")
    assert main.main(["--experiment", "resnet_scratch"]) == 2
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["mine.txt"]


# ----------------------------------------------------------------------------- what cannot run
class WideKernelNet(TinyNet):
    """TinyNet whose first layer is a 20-pixel kernel without padding: it cannot take 16-pixel images."""

    def __init__(self):
        super().__init__()
        self.stem[0] = nn.Conv2d(3, 8, 20)


@pytest.fixture
def wide_kernel(monkeypatch) -> str:
    monkeypatch.setitem(BACKBONES, "wide", Backbone("wide", WideKernelNet, head="fc", neck=("block",)))
    return "wide"


def test_an_image_size_too_small_for_the_backbone_is_refused_before_training(tiny_data, wide_kernel, tmp_path,
                                                                            capsys):
    code, out, err = cli(capsys, "-e", "resnet_frozen", "--data", tiny_data, "-b", wide_kernel, "--weights", "none",
                         "--quick", "--image-size", 16, "--out", tmp_path / "runs", "--no-progress")
    assert code == 2 and err.startswith("error: wide cannot take 16-pixel images"), err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("fields, says", [
    ({"augment": "bogus"}, 'recipe_fields.augment = "bogus" is none of'),
    ({"train_epochs": "3"}, "is not a whole number >= 1"),
    ({"train_epochs": 2.5}, "is not a whole number >= 1"),
    ({"batch_size": 0}, "is not a whole number >= 1"),
    ({"lrs": {"head": "fast"}}, "is not a table of positive learning rates"),
    ({"lrs": [1e-3]}, "is not a table of positive learning rates"),
    ({"label_smoothing": 2.0}, "is not a label smoothing"),
    ({"weight_decay": -1.0}, "is not a weight decay"),
    ({"ema_decay": 1.5}, "is not a decay in (0, 1)"),
    ({"tta": "yes"}, "is not true or false"),
    ({"loss": "mse"}, "is none of cross_entropy, bce_logit"),
    ({"bogus_field": 1}, "is not a field a tuned file may set"),
    ({"name": "x"}, "is not a field a tuned file may set"),
    ({"stack_head": True}, "is not a field a tuned file may set"),  # the recipe's build is written for its own head
    ({"first_lrs": None}, "do not fit: a staged recipe has first_epochs"),  # a staged recipe needs its first rates
    ({"lrs": {"head": 1e-3}}, "is not a table of positive learning rates for the recipe's groups (body, neck, head)"),
    ({"lrs": {"all": 1e-3}}, "for the recipe's groups (body, neck, head)"),
    ({"first_lrs": {"head": 1e-3, "body": 1e-4}}, "for the recipe's groups (head)"),
])
def test_a_tuned_file_with_a_field_outside_the_recipe_is_refused(tiny_data, tiny_backbone, tmp_path, monkeypatch,
                                                                 capsys, fields, says):
    monkeypatch.setenv("TL_TUNED_DIR", str(tmp_path / "tuned"))
    (tmp_path / "tuned").mkdir()
    tuned = {"recipe": "modern_finetune", "dataset": tiny_data.name, "backbone": tiny_backbone, "params": {},
             "recipe_fields": {"train_epochs": 2, "augment": "strong", "tta": True} | fields}
    (tmp_path / "tuned" / f"modern_finetune-{tiny_data.name}-{tiny_backbone}.json").write_text(json.dumps(tuned))
    code, _, err = cli(capsys, "-e", "tuned_modern_finetune", "--data", tiny_data, "-b", tiny_backbone, "--weights",
                       "none", "--quick", "--epochs", 2, "--image-size", 32, "--out", tmp_path / "runs",
                       "--no-progress")  # two epochs: the second stage builds its optimizer
    lines = err.strip().splitlines()  # one line per field that does not fit (the rules' line, then the field's)
    assert code == 2 and says in err and all(line.startswith("error: ") for line in lines), err
    assert len(lines) == (2 if fields == {"first_lrs": None} else 1), err
    assert not (tmp_path / "runs").exists()
    if fields == {"augment": "bogus"}:  # the valid fields alone: a recipe that trains
        tuned["recipe_fields"].pop("augment")
        (tmp_path / "tuned" / f"modern_finetune-{tiny_data.name}-{tiny_backbone}.json").write_text(json.dumps(tuned))
        code, out, err = cli(capsys, "-e", "tuned_modern_finetune", "--data", tiny_data, "-b", tiny_backbone,
                             "--weights", "none", "--quick", "--image-size", 32, "--out", tmp_path / "runs",
                             "--no-progress")
        assert code == 0 and "mirror averaged" in out, err


def one_error_line(capsys, *argv) -> str:
    code, _, err = cli(capsys, *argv)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    return err


def test_an_unknown_timm_model_is_one_message(capsys):
    err = one_error_line(capsys, "-e", "resnet_frozen", "-b", "timm:no_such_model", "--weights", "none")
    assert "timm has no model 'no_such_model'" in err


def test_a_weights_file_of_another_timm_model_is_one_message(tiny_data, tmp_path, capsys):
    torch.save(timm.create_model("mobilenetv3_small_050").state_dict(), tmp_path / "other.pth")
    code, _, err = cli(capsys, "-e", "resnet_frozen", "-b", "timm:resnet18", "--weights", tmp_path / "other.pth",
                       "--data", tiny_data, "--quick", "--no-progress", "--out", tmp_path / "runs")
    assert code == 2 and err.startswith(f"error: --weights {tmp_path / 'other.pth'} does not fit this model")
    assert "saved from another architecture (check --backbone)" in err


def test_batchnorm_only_training_on_a_network_without_batchnorm_stops_before_training(tiny_data, tmp_path, capsys):
    code, out, err = cli(capsys, "-e", "resnet_bn_only", "-b", "timm:convnext_atto", "--weights", "none",
                         "--data", tiny_data, "--quick", "--no-progress", "--out", tmp_path / "runs")
    assert code == 2 and err.startswith("error: resnet_bn_only trains the BatchNorm layers")
    assert "timm:convnext_atto has no BatchNorm layer" in err and len(err.strip().splitlines()) == 1
    assert "epoch" not in out.lower()


# ----------------------------------------------------------------------------- --device-images
def test_device_images_with_workers_is_a_clear_error(tiny_data, tiny_backbone, tmp_path, capsys):
    code = main.main(["-e", "resnet_finetune", "-b", "tiny", "--data", str(tiny_data), "--out", str(tmp_path / "runs"),
                      "--device-images", "--workers", "2", "--weights", "none", "--no-progress"])
    assert code == 2
    assert "--device-images" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.usefixtures("own_cache_dir")
def test_device_images_over_the_limit_does_not_leave_the_run_decoding_without_workers(
        tiny_data, tiny_backbone, tmp_path, monkeypatch, capsys):
    """--device-images forces --workers 0. Images over --cache-limit-gb (default 2 GB, a GPU's
    memory is far larger) are refused before any loader is made, with the way out in the
    message, rather than the image cache dropped and every JPEG decoded in the main process
    with no workers: much slower than not asking for the option at all."""
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


@pytest.mark.usefixtures("own_cache_dir")
def test_device_images_over_the_limit_is_refused_before_a_staged_run_trains(tiny_data, tiny_backbone, tmp_path,
                                                                              capsys):
    """modern_finetune --no-augment: stage 1 (frozen body) runs on cached features and decodes no
    image; the image cache is first needed when stage 2 starts. --device-images over
    --cache-limit-gb is refused before stage 1 trains ('raise --cache-limit-gb'), since a resume
    may change neither option; a run that did save a stage finishes with the resume the message
    names."""
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


# ----------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_before_training_is_a_message(tmp_path, tiny_backbone, capsys, monkeypatch):

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C during the feature pass

    monkeypatch.setattr(feature_store, "plan_cache", interrupted)
    code, _, err = train_one_epoch(capsys, write_image_folder(tmp_path / "d"), tmp_path / "runs", "--weights", "none",
                         experiment="resnet_frozen")
    assert code == 130 and "interrupted before training started" in err  # the shell's status for Ctrl-C
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_ctrl_c_in_training_exits_130_with_the_command_that_resumes(tmp_path, tiny_backbone, capsys, monkeypatch):
    write = run_folder.write_history_csv

    def ctrl_c_after_epoch_1(history, path):
        write(history, path)
        if history.rows[-1]["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(run_folder, "write_history_csv", ctrl_c_after_epoch_1)
    code, _, err = cli(capsys, "-e", "resnet_scratch", "-b", "tiny", "--data", write_image_folder(tmp_path / "d"),
                       "--out", tmp_path / "runs", "--epochs", "2", "--quick", "--no-progress")
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert code == 130  # the shell's status for Ctrl-C, not 2 ("your input")
    assert err.startswith("error: interrupted:")
    assert f"continue with: python main.py --resume {run_dir}/last.ckpt" in err
    monkeypatch.setattr(run_folder, "write_history_csv", write)
    assert cli(capsys, "--resume", run_dir / "last.ckpt", "--no-progress")[0] == 0  # the hint works as printed
    assert pd.read_csv(run_dir / "history.csv").epoch.max() == 2
