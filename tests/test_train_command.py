"""Bad input never corrupts labels, deletes files or shows a traceback (issue 13).

Each test builds its bad input itself (small synthetic images in tmp_path) and checks the
exact outcome: the classes and data set sizes a run reports, the files left on disk, the
exit status, and that no output holds a traceback. Exit status 2 means "your input or
your machine": one message that names the thing and what to do.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import main
from tests.conftest import TinyNet, write_image_folder
from tl import TLError
from tl.data import build_transforms
from tl.engine import feature_store, images, selection
from tl.engine.images import load_rgb
from tl.engine.prepare import prepare_dogs_vs_cats
from tl.engine.selection import describe_skipped, image_datasets

MEAN = STD = (0.5, 0.5, 0.5)


# ----------------------------------------------------------------------------- helpers
def cli(capsys, *argv) -> tuple[int, str, str]:
    """main.main(argv) -> (exit status, stdout, stderr); argparse's exits count too. No traceback, ever."""
    try:
        code = main.main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def train(capsys, data_dir, out, *extra, experiment="resnet_scratch"):
    """A one-epoch run of the tiny backbone; returns (exit status, stdout, stderr)."""
    return cli(capsys, "-e", experiment, "-b", "tiny", "--data", data_dir, "--epochs", "1", "--out", out,
               "--no-progress", "--workers", "0", *extra)


def run_config(out: Path) -> dict:
    (run_dir,) = out.iterdir()
    return json.loads((run_dir / "config.json").read_text())


def picture(path: Path, size=(40, 40), seed=0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def truncated_jpeg(path: Path) -> Path:
    pixels = np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "JPEG", quality=95)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # header intact, second half of the picture gone
    return path


def header_only_png(path: Path, width: int, height: int) -> Path:
    """A PNG that *declares* width x height 1-bit pixels and holds no pixel data (a few dozen bytes)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return path


def class_folders_only(root: Path, counts: dict[str, int]) -> Path:
    """root/<class>/*.png without a train/val split (the --val-split layout)."""
    for k, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            picture(root / name / f"{i:03d}.png", seed=100 * k + i)
    return root


# ----------------------------------------------------------------------------- which folders are classes
def test_hidden_and_system_folders_are_never_classes(tmp_path, tiny_backbone, capsys):
    d = write_image_folder(tmp_path / "d")
    for folder in (d / "train" / ".thumbs", d / "train" / "__MACOSX", d / "train" / "class_0" / ".cache"):
        folder.mkdir()
        picture(folder / "x.png")
    (d / "val" / ".ipynb_checkpoints").mkdir()  # empty: it used to stop the run with a wrong message
    code, out, _ = train(capsys, d, tmp_path / "runs")
    assert code == 0
    config = run_config(tmp_path / "runs")
    assert config["classes"] == ["class_0", "class_1"]
    assert config["dataset_sizes"] == {"train": 24, "val": 12}
    assert "ignored 4 folder(s) that are not classes" in out and ".thumbs" in out
    # --evaluate and --show-data read the same definition
    (run_dir,) = (tmp_path / "runs").iterdir()
    code, out, _ = cli(capsys, "--evaluate", run_dir / "best.pth", "--data", d)
    assert code == 0 and "(12 images)" in out and "ignored 1 folder(s)" in out
    code, out, _ = cli(capsys, "--show-data", "--data", d, "--backbone", "tiny", "--out", tmp_path / "show")
    assert code == 0 and "ignored 4 folder(s)" in out


def test_a_link_to_the_parent_folder_neither_loops_nor_relabels(tmp_path, tiny_backbone, capsys):
    d = write_image_folder(tmp_path / "d")
    (d / "train" / "class_1" / "up").symlink_to("..")  # train/class_1/up -> train/: ants-in-bees, and a loop
    elsewhere = write_image_folder(tmp_path / "elsewhere", phases=("val",)) / "val" / "class_1"
    for f in (d / "val" / "class_1").iterdir():
        f.unlink()
    (d / "val" / "class_1").rmdir()
    (d / "val" / "class_1").symlink_to(elsewhere)  # a class folder that is a link to another disk
    code, _, err = train(capsys, d, tmp_path / "refused")
    # its files leave the data folder: left out by default, so the class is empty, and the message says why
    assert code == 2 and "no usable image in class folder(s) ['class_1']" in err and "--follow-links" in err
    assert f"leads to {elsewhere.resolve() / '000.png'}" in err
    code, out, _ = train(capsys, d, tmp_path / "runs", "--follow-links")  # followed when asked for
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
    code, out, _ = train(capsys, d, tmp_path / "runs")
    assert code == 0 and run_config(tmp_path / "runs")["dataset_sizes"] == {"train": 24, "val": 12}
    assert "5 file(s) are reached through links that leave the data folder, into " + str(system.resolve()) in out
    assert "left out (pass --follow-links to include them)" in out
    sets = image_datasets(d, build_transforms(MEAN, STD, size=32), follow_links=True)
    assert len(sets["val"]) == 17


def test_gif_jfif_and_jpe_files_are_decided_by_one_rule_and_named(tmp_path):
    d = write_image_folder(tmp_path / "d")
    folder = d / "train" / "class_0"
    Image.open(folder / "000.png").convert("RGB").save(folder / "photo.jfif", format="JPEG")
    Image.open(folder / "000.png").convert("RGB").save(folder / "photo2.jpe", format="JPEG")
    Image.open(folder / "000.png").convert("P").save(folder / "still.gif")
    frames = [Image.open(folder / f"00{i}.png").convert("P") for i in range(2)]
    frames[0].save(folder / "moving.gif", save_all=True, append_images=frames[1:])
    (folder / "notes.txt").write_text("not a photo")
    sets = image_datasets(d, build_transforms(MEAN, STD, size=32))
    names = {Path(p).name for p, _ in sets["train"].samples}
    assert {"photo.jfif", "photo2.jpe"} <= names and not names & {"still.gif", "moving.gif", "notes.txt"}
    report = describe_skipped(sets)
    assert "left out 3 file(s) that are not images" in report
    for name in ("still.gif", "moving.gif"):
        assert f"{folder / name}: a GIF" in report
    assert f"{folder / 'notes.txt'}: not an image file (.txt" in report


def test_hymenoptera_keeps_its_files_and_names_the_placeholder(hymenoptera):
    sets = image_datasets(hymenoptera, build_transforms(MEAN, STD, size=32))
    assert {p: len(ds) for p, ds in sets.items()} == {"train": 244, "val": 153}
    assert f"{hymenoptera / 'train' / 'ants' / 'imageNotFound.gif'}: a GIF" in describe_skipped(sets)


def test_a_file_in_two_classes_has_no_label_and_is_skipped(tmp_path):
    d = write_image_folder(tmp_path / "d")
    os.link(d / "train" / "class_0" / "000.png", d / "train" / "class_1" / "same.png")  # one file, two names
    sets = image_datasets(d, build_transforms(MEAN, STD, size=32))
    assert len(sets["train"]) == 23  # 11 + 12: the file is in neither class
    assert "the same file is also in class class_1: its label is ambiguous" in describe_skipped(sets)


def test_a_class_folder_that_links_to_its_parent_gets_no_files(tmp_path, tiny_backbone, capsys):
    d = write_image_folder(tmp_path / "d")
    for phase in ("train", "val"):
        (d / phase / "all").symlink_to(".")  # a "class" holding every other class
        (d / phase / "class_0" / "loop.jpg").symlink_to("loop.jpg")  # a file link to itself
    code, _, err = train(capsys, d, tmp_path / "runs")
    assert code == 2 and "no usable image in class folder(s) ['all']" in err
    sets = images.scan_classes(str(d / "train"), ["all", "class_0", "class_1"])
    assert [t for _, t in sets["samples"]].count(1) == 12 and len(sets["samples"]) == 24
    assert (str(d / "train" / "class_0" / "loop.jpg"), "cannot be read (Too many levels of symbolic links)") \
        in sets["skipped"]


def test_a_file_in_train_and_val_is_refused(tmp_path, tiny_backbone, capsys):
    d = write_image_folder(tmp_path / "d")
    os.link(d / "train" / "class_0" / "000.png", d / "val" / "class_0" / "copy.png")
    code, _, err = train(capsys, d, tmp_path / "runs")
    assert code == 2 and "1 file(s) belong to two splits" in err and "copy.png" in err
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- --val-split
def test_val_split_refuses_a_folder_that_is_already_split(tmp_path, tiny_backbone, capsys):
    d = write_image_folder(tmp_path / "d")
    code, _, err = train(capsys, d, tmp_path / "runs", "--val-split", "0.2")
    assert code == 2 and "is already split (train/, val/)" in err and f"--data {d / 'train'}" in err
    assert not (tmp_path / "runs").exists()


def test_val_split_stops_when_a_class_is_too_small(tmp_path, tiny_backbone, capsys):
    d = class_folders_only(tmp_path / "d", {"big": 20, "tiny": 1})
    code, _, err = train(capsys, d, tmp_path / "runs", "--val-split", "0.2")
    assert code == 2 and "tiny (1 usable image(s) -> 0 val, 1 train)" in err
    code, _, err = train(capsys, d, tmp_path / "runs", "--val-split", "0.99")
    assert code == 2 and "big (20 usable image(s) -> 20 val, 0 train)" in err
    for bad in ("1", "1.5", "0", "abc"):
        code, _, err = train(capsys, d, tmp_path / "runs", "--val-split", bad)
        assert code == 2 and "--val-split" in err
    assert not (tmp_path / "runs").exists()


def test_val_split_honours_quick_and_max_per_class(tmp_path, tiny_backbone, capsys):
    d = class_folders_only(tmp_path / "d", {"a": 20, "b": 20})
    code, _, _ = train(capsys, d, tmp_path / "q", "--val-split", "0.25", "--quick")
    assert code == 0
    config = run_config(tmp_path / "q")
    assert config["dataset_sizes"] == {"train": 16, "val": 10}  # 15/5 per class, then at most 8
    assert config["options"]["max_per_class"] == 8
    code, _, _ = train(capsys, d, tmp_path / "m", "--val-split", "0.25", "--max-per-class", "3")
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
        assert train(capsys, d, tmp_path / f"r{n}", "--val-split", "0.25", *extra)[0] == 0
    assert seen[0] == seen[1]  # another training seed, the same val images
    assert seen[0] != seen[2] and len(seen[2]) == 6
    assert run_config(tmp_path / "r2")["options"]["split_seed"] == 7


def test_evaluate_reads_the_data_and_the_split_from_the_run(tmp_path, tiny_backbone, capsys):
    d = class_folders_only(tmp_path / "d", {"a": 12, "b": 12})
    assert train(capsys, d, tmp_path / "runs", "--val-split", "0.25", "--split-seed", "3")[0] == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    code, out, _ = cli(capsys, "--evaluate", run_dir / "best.pth")  # no --data, no --backbone
    assert code == 0 and f"data: {d} (from the run's config.json)" in out and "(6 images)" in out


# ----------------------------------------------------------------------------- broken images
def test_a_truncated_jpeg_is_skipped_alike_by_every_path(tmp_path, tiny_backbone, capsys):
    d = write_image_folder(tmp_path / "d")
    truncated_jpeg(d / "train" / "class_1" / "cut.jpg")
    truncated_jpeg(d / "val" / "class_0" / "cut.jpg")
    histories = {}
    for name, extra in (("cached", []), ("uncached", ["--no-feature-cache"]), ("images", ["--image-cache"])):
        code, out, _ = train(capsys, d, tmp_path / name, "--weights", "none", "--no-augment", "--epochs", "2",
                             *extra, experiment="resnet_frozen")
        assert code == 0 and "skipped 2 unusable image file(s)" in out and "cut.jpg: OSError" in out
        config = run_config(tmp_path / name)
        assert config["dataset_sizes"] == {"train": 24, "val": 12}
        history = pd.read_csv(next((tmp_path / name).iterdir()) / "history.csv")
        histories[name] = [(r.epoch, r.phase, r.acc, round(r.loss, 5)) for r in history.itertuples()]
    assert run_config(tmp_path / "cached")["feature_cache"] == "train + val (exact: no augmentation)"
    assert histories["cached"] == histories["uncached"] == histories["images"]
    (run_dir,) = (tmp_path / "cached").iterdir()
    code, out, _ = cli(capsys, "--evaluate", run_dir / "best.pth", "--data", d)
    assert code == 0 and "(12 images)" in out and "skipped 1 unusable" in out and "cut.jpg" in out


def test_a_file_the_quick_scan_misses_stops_the_run_by_name(tmp_path, tiny_backbone, capsys, monkeypatch):
    d = write_image_folder(tmp_path / "d")
    cut = truncated_jpeg(d / "train" / "class_1" / "cut.jpg")
    real = images.check_image
    # stand-in for damage the end-marker test cannot see: the quick scan passes the file
    monkeypatch.setattr(images, "check_image", lambda path, verify=False: real(path, True) if verify else None)
    code, _, err = train(capsys, d, tmp_path / "runs", "--workers", "2")  # the error crosses a worker process
    assert code == 2
    assert err.startswith(f"error: cannot decode {cut} (OSError: image file is truncated") and "--verify-images" in err
    code, out, _ = train(capsys, d, tmp_path / "verified", "--verify-images")
    assert code == 0 and "cut.jpg: OSError: image file is truncated" in out
    assert run_config(tmp_path / "verified")["dataset_sizes"] == {"train": 24, "val": 12}


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(tmp_path, tiny_backbone, capsys, monkeypatch):
    d = write_image_folder(tmp_path / "d")
    truncated_jpeg(d / "train" / "class_1" / "cut.jpg")
    monkeypatch.setattr(images, "check_image", lambda path, verify=False: None)  # the scan misses it
    assert train(capsys, d, tmp_path / "runs")[0] == 2
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_damaged_feature_cache_file_is_rebuilt(tiny_data, tiny_backbone, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TL_CACHE_DIR", str(tmp_path / "cache"))
    frozen = ["--weights", "none", "--no-augment"]
    assert train(capsys, tiny_data, tmp_path / "a", *frozen, experiment="resnet_frozen")[0] == 0
    for stored in (tmp_path / "cache").iterdir():
        stored.write_bytes(b"")  # an interrupted write, a full disk, a bad sector
    assert train(capsys, tiny_data, tmp_path / "b", *frozen, experiment="resnet_frozen")[0] == 0


def _mode_image(mode: str) -> tuple[Image.Image, str, np.ndarray]:
    """(image in `mode`, file suffix, the RGB pixels it must become) for a 1x4 strip."""
    if mode == "I":  # 32-bit integer, values 0..255: used to come out all black
        values = np.array([[0, 64, 128, 255]], np.int32)
        return Image.fromarray(values, "I"), ".tiff", np.repeat(values[..., None], 3, 2)
    if mode == "I;16":
        values = np.array([[0, 257 * 64, 257 * 128, 65535]], np.uint16)
        return Image.fromarray(values), ".png", np.repeat(np.array([[0, 64, 128, 255]])[..., None], 3, 2)
    if mode == "F":
        values = np.array([[0.0, 0.25, 0.5, 1.0]], np.float32)
        return Image.fromarray(values, "F"), ".tiff", np.repeat(np.array([[0, 64, 128, 255]])[..., None], 3, 2)
    if mode == "1":
        return (Image.fromarray(np.array([[0, 255, 0, 255]], np.uint8)).convert("1"), ".png",
                np.repeat(np.array([[0, 255, 0, 255]])[..., None], 3, 2))
    if mode == "CMYK":
        img = Image.new("CMYK", (4, 1), (0, 255, 255, 0))  # no cyan, full magenta + yellow: red
        return img, ".tiff", np.tile(np.array([255, 0, 0]), (1, 4, 1))
    if mode == "LA":  # gray 100 opaque, and fully transparent pixels, which must become white
        img = Image.fromarray(np.array([[[100, 255], [0, 0], [100, 255], [0, 0]]], np.uint8), "LA")
        return img, ".png", np.array([[[100] * 3, [255] * 3, [100] * 3, [255] * 3]])
    if mode == "P":  # a palette with a transparent index
        img = Image.fromarray(np.array([[0, 1, 0, 1]], np.uint8), "P")
        img.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
        img.info["transparency"] = 1
        return img, ".png", np.array([[[10, 20, 30], [255] * 3, [10, 20, 30], [255] * 3]])
    raise ValueError(mode)


@pytest.mark.parametrize("mode", ["I", "I;16", "F", "1", "CMYK", "LA", "P"])
def test_every_mode_becomes_the_right_rgb(tmp_path, mode):
    img, suffix, expected = _mode_image(mode)
    path = tmp_path / f"img{suffix}"
    img.save(path, **({"transparency": 1} if mode == "P" else {}))
    assert Image.open(path).mode == mode
    out = np.asarray(load_rgb(path)).astype(int)
    assert out.shape == (1, 4, 3)
    assert np.abs(out - expected).max() <= 1, out.tolist()


def test_decompression_bombs_are_skipped_before_decoding(tmp_path, capsys):
    d = write_image_folder(tmp_path / "d")
    folder = d / "train" / "class_0"
    Image.new("1", (100000, 1)).save(folder / "strip.png")  # a few hundred bytes, 19.7 GB once resized
    Image.new("1", (20000, 2)).save(folder / "thin.png")
    header_only_png(folder / "huge.png", 12000, 12000)  # 144 M pixels declared in 57 bytes
    assert (folder / "strip.png").stat().st_size < 1000
    sets = image_datasets(d, build_transforms(MEAN, STD, size=32))
    assert len(sets["train"]) == 24
    report = describe_skipped(sets)
    assert "strip.png: extreme aspect ratio 100000x1" in report and "thin.png: extreme aspect ratio" in report
    assert "huge.png: too many pixels" in report
    with pytest.raises(images.UnusableImage, match="extreme aspect ratio"):  # --predict reads through the guard too
        load_rgb(folder / "strip.png")


# ----------------------------------------------------------------------------- --prepare
def _kaggle(root: Path, n: int = 5) -> Path:
    root.mkdir(parents=True)
    for name in ("cat", "dog"):
        for i in range(n):
            picture(root / f"{name}.{i}.jpg", (16, 16), seed=i)
    return root


def test_prepare_never_touches_the_source(tmp_path, capsys):
    d = tmp_path / "D"
    src = _kaggle(d / "train")
    before = sorted(p.name for p in src.iterdir())
    for dest, extra in ((d, ["--force"]), (d, []), (src / "out", ["--force"]), (src, [])):
        code, _, err = cli(capsys, "--prepare", "dogs-vs-cats", "--src", src, "--dest", dest, *extra)
        assert code == 2 and "overlap" in err
    assert sorted(p.name for p in src.iterdir()) == before  # nothing deleted, nothing added
    assert all(p.is_file() and not p.is_symlink() for p in src.iterdir())


def test_prepare_never_reports_success_over_broken_links(tmp_path, monkeypatch):
    src = _kaggle(tmp_path / "flat")

    def no_hard_links(*args, **kwargs):
        raise OSError(errno.EXDEV, "cross-device link")

    def dangling(self, target, *args, **kwargs):
        os.symlink(str(target) + ".gone", self)  # a link that leads nowhere

    monkeypatch.setattr(os, "link", no_hard_links)
    monkeypatch.setattr(Path, "symlink_to", dangling)
    with pytest.raises(TLError, match="does not lead to a readable file"):
        prepare_dogs_vs_cats(src, tmp_path / "dest", log=lambda s: None)
    assert list((tmp_path / "dest").iterdir()) == []  # what it made is gone again
    assert len(list(src.iterdir())) == 10


# ----------------------------------------------------------------------------- damaged files and configs
@pytest.fixture
def trained_run(tiny_data, tiny_backbone, tmp_path, capsys) -> Path:
    assert train(capsys, tiny_data, tmp_path / "runs")[0] == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    return run_dir


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
        code, _, err = cli(capsys, *argv)
        assert code == 2 and str(bad) in err and expected in err, argv
    assert not (tmp_path / "new").exists()  # no half-made run folder
    # a damaged checkpoint inside a run folder: --evaluate and --predict use the same loader
    code, _, err = cli(capsys, "--resume", trained_run)  # a folder where a file belongs
    assert code == 2 and f"{trained_run} is a folder; pass the weights file inside it" in err
    (trained_run / "best.pth").write_bytes(b"")
    code, _, err = cli(capsys, "--evaluate", trained_run / "best.pth", "--data", tiny_data)
    assert code == 2 and "empty file" in err


@pytest.mark.parametrize("config", ["{not json", "[]", '{"recipe": {}}'])
def test_a_malformed_config_beside_a_checkpoint(trained_run, tiny_data, capsys, config):
    (trained_run / "config.json").write_text(config)
    for argv in (["--evaluate", trained_run / "best.pth", "--data", tiny_data],
                 ["--predict", tiny_data / "val" / "class_0" / "000.png", "--checkpoint", trained_run / "best.pth"]):
        code, _, err = cli(capsys, *argv)
        assert code == 2 and "config.json is not a run config this project wrote" in err


def test_weights_of_a_whole_pickled_model_load_with_allow_pickle(tiny_data, tiny_backbone, tmp_path, capsys):
    torch.save(TinyNet(), tmp_path / "whole.pt")  # torch.save(model): the pickled object
    code, _, err = train(capsys, tiny_data, tmp_path / "a", "--weights", tmp_path / "whole.pt")
    assert code == 2 and "--allow-pickle" in err and not (tmp_path / "a").exists()
    code, _, _ = train(capsys, tiny_data, tmp_path / "b", "--weights", tmp_path / "whole.pt", "--allow-pickle")
    assert code == 0 and run_config(tmp_path / "b")["weights_kind"] == "file"


# ----------------------------------------------------------------------------- the machine and the values
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
        code, _, err = train(capsys, tiny_data, tmp_path / "runs")
    finally:
        locked.chmod(0o755)
    assert code == 2 and err == f"error: permission denied: {locked}: make it readable (and writable, for " \
                                "outputs) or choose another path\n"
    assert not (tmp_path / "runs").exists()


def test_impossible_outputs_stop_before_any_work(tiny_data, tiny_backbone, tmp_path, capsys, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    code, _, err = train(capsys, tiny_data, tmp_path / "a-file" / "runs")
    assert code == 2 and "is a file, not a folder; choose another --out" in err
    monkeypatch.setenv("TL_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    code, _, err = train(capsys, tiny_data, tmp_path / "runs", experiment="resnet_frozen")
    assert code == 2 and "TL_CACHE_DIR" in err and "--no-feature-cache" in err
    assert not (tmp_path / "runs").exists()
    code, _, err = cli(capsys, "--show-data", "--data", tiny_data, "-b", "tiny", "--out", tmp_path / "a-file")
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
        code, _, err = train(capsys, tiny_data, ro / "runs")
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True) if os.geteuid() == 0 else ro.chmod(0o755)
    assert code == 2 and f"cannot write in {ro}" in err


def test_a_full_disk(tiny_data, tiny_backbone, tmp_path, capsys):
    full = tmp_path / "full"
    if os.geteuid() != 0 or not _mount_tmpfs(full, "size=32k"):
        pytest.skip("needs a small file system (mount as root) to fill")
    try:
        code, _, err = train(capsys, tiny_data, full / "runs", "--no-feature-cache")
    finally:
        subprocess.run(["umount", str(full)], capture_output=True)
    assert code == 2 and err.startswith("error: no space left on the device") and "another disk" in err


@pytest.mark.parametrize("device, message", [("mps", "Metal (MPS) backend is not available"),
                                             ("meta", "'meta' is not a device this project trains on"),
                                             ("cuda:7", "cuda"), ("tpu", "unknown device")])
def test_devices_that_cannot_train(tiny_data, tiny_backbone, tmp_path, capsys, device, message):
    code, _, err = train(capsys, tiny_data, tmp_path / "runs", "--device", device)
    assert code == 2 and message in err and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("seed", ["99999999999999999999999", "-1", "4294967296", "1.5"])
def test_seeds_out_of_range(tiny_data, tmp_path, capsys, seed):
    code, _, err = train(capsys, tiny_data, tmp_path / "runs", "--seed", seed)
    assert code == 2 and "--seed" in err


def test_tl_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("TL_DEBUG", "1")
    with pytest.raises(TLError, match="data folder not found"):
        main.main(["-e", "resnet_scratch", "--data", str(tmp_path / "nowhere")])
    assert "TL_DEBUG=1" in main.build_parser().format_help()


# ----------------------------------------------------------------------------- found by the review of issues 12-14
def test_test_files_shared_with_train_are_refused_before_training(tmp_path, tiny_backbone, capsys):
    d = write_image_folder(tmp_path / "d", phases=("train", "val", "test"))
    for test_file in (d / "test" / "class_0").iterdir():  # the "test" images are training images
        test_file.unlink()
        os.link(d / "train" / "class_0" / test_file.name, test_file)
    code, _, err = train(capsys, d, tmp_path / "runs")
    assert code == 2 and "two splits" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_broken_test_split_stops_the_run_before_it_trains(tmp_path, tiny_backbone, capsys):
    d = write_image_folder(tmp_path / "d", phases=("train", "val", "test"))
    for f in (d / "test" / "class_1").iterdir():
        f.write_bytes(b"not an image")
    code, out, err = train(capsys, d, tmp_path / "runs")
    assert code == 2 and "class_1" in err and "test" in err
    assert "epoch  1" not in out  # nothing trained
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_file_name_that_is_not_utf8_trains(tmp_path, tiny_backbone, capsys):
    d = write_image_folder(tmp_path / "d")
    folder = os.fsencode(d / "train" / "class_0")
    os.rename(os.path.join(folder, b"000.png"), os.path.join(folder, b"0\xe9.png"))  # Latin-1 bytes in the name
    code, _, _ = train(capsys, d, tmp_path / "runs")
    assert code == 0 and run_config(tmp_path / "runs")["dataset_sizes"] == {"train": 24, "val": 12}


def test_a_config_with_wrong_types_is_a_message(tmp_path, tiny_backbone, capsys):
    d = write_image_folder(tmp_path / "d")
    assert train(capsys, d, tmp_path / "runs")[0] == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    config = json.loads((run_dir / "config.json").read_text())
    for field, value in (("checksums", "abc"), ("options", {**config["options"], "val_split": "x"})):
        (run_dir / "config.json").write_text(json.dumps({**config, field: value}))
        code, _, err = cli(capsys, "--evaluate", run_dir / "best.pth", "--data", d)
        assert code == 2 and "not a run config" in err, field


def test_ctrl_c_before_training_is_a_message(tmp_path, tiny_backbone, capsys, monkeypatch):

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C during the feature pass

    monkeypatch.setattr(feature_store, "plan_cache", interrupted)
    code, _, err = train(capsys, write_image_folder(tmp_path / "d"), tmp_path / "runs", "--weights", "none",
                         experiment="resnet_frozen")
    assert code == 130 and "interrupted before training started" in err  # the shell's status for Ctrl-C
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
