"""Document 000's raw Kaggle layout, and data folders that are not clean."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main
from tests.conftest import DOGS_VS_CATS, require_real_data, write_image_folder
from tl import TLError
from tl.data import build_transforms
from tl.engine.checkpoint import load_checkpoint
from tl.engine.prepare import prepare_dogs_vs_cats
from tl.engine.selection import describe_links, image_datasets


def _flat_kaggle(root: Path, per_class: int = 50) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, colour in (("cat", (200, 60, 60)), ("dog", (60, 60, 200))):
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.integers(-50, 50, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"{name}.{i}.jpg")
    (root / "readme.txt").write_text("not an image")
    (root / "cat.x.jpg").write_bytes(b"")  # wrong pattern
    (root / "dog.12.png").write_bytes(b"")  # wrong extension
    return root


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.jpg"))


def test_split_counts_order_and_determinism(tmp_path):
    src = _flat_kaggle(tmp_path / "flat")
    report = prepare_dogs_vs_cats(src, tmp_path / "a", log=lambda s: None)
    assert report["counts"] == {p: {"cat": n, "dog": n} for p, n in (("train", 32), ("val", 9), ("test", 9))}
    assert sorted(report["ignored"]) == ["cat.x.jpg", "dog.12.png", "readme.txt"]
    # by index, numerically: cat.0 .. cat.31 train, cat.32 .. cat.40 val, the rest test
    assert (tmp_path / "a" / "train" / "cat" / "cat.31.jpg").exists()
    assert (tmp_path / "a" / "val" / "cat" / "cat.32.jpg").exists()
    assert (tmp_path / "a" / "test" / "dog" / "dog.49.jpg").exists()
    prepare_dogs_vs_cats(src, tmp_path / "b", log=lambda s: None)
    assert _listing(tmp_path / "a") == _listing(tmp_path / "b")


def test_links_when_possible_copies_otherwise(tmp_path, monkeypatch):
    src = _flat_kaggle(tmp_path / "flat", per_class=5)
    report = prepare_dogs_vs_cats(src, tmp_path / "linked", log=lambda s: None)
    assert report["methods"] == {"hard-linked": 10}
    linked = tmp_path / "linked" / "train" / "cat" / "cat.0.jpg"
    assert os.stat(linked).st_ino == os.stat(src / "cat.0.jpg").st_ino  # the same file, not a copy

    def refuse(*args, **kwargs):
        raise OSError("cross-device link")

    monkeypatch.setattr(os, "link", refuse)
    monkeypatch.setattr(Path, "symlink_to", refuse)
    report = prepare_dogs_vs_cats(src, tmp_path / "copied", log=lambda s: None)
    assert report["methods"] == {"copied": 10}
    assert (tmp_path / "copied" / "test" / "dog" / "dog.4.jpg").read_bytes() == (src / "dog.4.jpg").read_bytes()


def test_a_non_empty_destination_is_refused_and_force_replaces_only_its_own_splits(tmp_path):
    src = _flat_kaggle(tmp_path / "flat", per_class=5)
    dest = tmp_path / "dest"
    prepare_dogs_vs_cats(src, dest, log=lambda s: None)
    (dest / "train" / "old").mkdir()
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(TLError, match="not empty.*--force replaces them"):
        prepare_dogs_vs_cats(src, dest, log=lambda s: None)
    prepare_dogs_vs_cats(src, dest, force=True, log=lambda s: None)  # the splits it made itself
    assert not (dest / "train" / "old").exists() and (dest / "notes.txt").read_text() == "mine"
    foreign = tmp_path / "foreign"
    (foreign / "train" / "old").mkdir(parents=True)
    with pytest.raises(TLError, match="not empty; choose a new or empty --dest$"):
        prepare_dogs_vs_cats(src, foreign, log=lambda s: None)
    with pytest.raises(TLError, match="replaces only splits made by --prepare"):
        prepare_dogs_vs_cats(src, foreign, force=True, log=lambda s: None)
    assert (foreign / "train" / "old").is_dir()
    with pytest.raises(TLError, match="no cat.N.jpg"):
        prepare_dogs_vs_cats(tmp_path / "dest" / "train", tmp_path / "x", log=lambda s: None)


def test_real_subset_prepares_trains_and_reports_test_accuracy(tmp_path, capsys):
    src = require_real_data(DOGS_VS_CATS) / "train"
    assert main.main(["--prepare", "dogs-vs-cats", "--src", str(src), "--dest", str(tmp_path / "dvc")]) == 0
    counts = {p: len(list((tmp_path / "dvc" / p / "cat").iterdir())) for p in ("train", "val", "test")}
    assert counts == {"train": 641, "val": 180, "test": 180}
    assert main.main(["-e", "resnet_frozen", "-b", "efficientnet_lite0", "--data", str(tmp_path / "dvc"), "--quick",
                      "--out", str(tmp_path / "runs"), "--no-progress"]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    capsys.readouterr()
    assert main.main(["--evaluate", str(run_dir / "best.pth"), "--data", str(tmp_path / "dvc"),
                      "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "(360 images)" in out and "cat" in out and "dog" in out


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


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_data, tiny_backbone, tmp_path, capsys):
    code = main.main(["-e", "resnet_scratch", "-b", "tiny", "--data", str(tiny_data), "--epochs", "3",
                      "--lr-scale", "1e30", "--out", str(tmp_path / "runs"), "--no-progress", "--workers", "0"])
    assert code == 2
    assert "loss became" in capsys.readouterr().err
    (run_dir,) = (tmp_path / "runs").iterdir()
    ckpt = load_checkpoint(run_dir / "last.ckpt")
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())


def test_the_links_prepare_makes_are_its_own_and_stay_usable(tmp_path, monkeypatch):
    src = _flat_kaggle(tmp_path / "flat", per_class=5)

    def no_hard_links(*args, **kwargs):
        raise OSError(errno.EXDEV, "cross-device link")

    monkeypatch.setattr(os, "link", no_hard_links)
    report = prepare_dogs_vs_cats(src, tmp_path / "dest", log=lambda s: None)
    assert report["methods"] == {"symlinked": 10}
    sets = image_datasets(tmp_path / "dest", build_transforms((0.5,) * 3, (0.5,) * 3, size=32),
                          phases=("train", "val", "test"))
    assert sum(len(ds) for ds in sets.values()) == 10  # every link leads out of dest, into --src: still used
    assert not any(ds.outside for ds in sets.values()) and describe_links(sets) == []
