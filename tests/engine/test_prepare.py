"""tl/engine/prepare.py: document 000's raw Kaggle layout split into train/val/test, by links
where possible and copies otherwise, never over a folder it did not make, and never reporting
success over broken links."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import kaggle_folder
from tl import TLError
from tl.data import build_transforms
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


def test_prepare_never_reports_success_over_broken_links(tmp_path, monkeypatch):
    src = kaggle_folder(tmp_path / "flat")

    def no_hard_links(*args, **kwargs):
        raise OSError(errno.EXDEV, "cross-device link")

    def dangling(self, target, *args, **kwargs):
        os.symlink(str(target) + ".gone", self)  # a link that leads nowhere

    monkeypatch.setattr(os, "link", no_hard_links)
    monkeypatch.setattr(Path, "symlink_to", dangling)
    with pytest.raises(TLError, match="does not lead to a readable file"):
        prepare_dogs_vs_cats(src, tmp_path / "dest", log=lambda s: None)
    assert not (tmp_path / "dest").exists()  # what it made is gone again, the folder it made for --dest too
    assert len(list(src.iterdir())) == 10
