"""Tuning without peeking (experiments/tune.py): the inner split carved from train, a search
that never reads val/ or test/, its study file (continued, refused when it belongs to another
recipe or data set) and what it writes: the tuned numbers, the pages, the `tuned_<recipe>` recipe."""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import write_image_folder
from tl import TLError
from tl.data import build_transforms
from tl.engine import records
from tl.engine.selection import ImageChoice, inner_split, select_images

pytestmark = pytest.mark.usefixtures("own_cache_dir")
TRANSFORMS = build_transforms((0.5,) * 3, (0.5,) * 3, size=16, augment=False)


def _choice(data: Path, **kw) -> ImageChoice:
    return ImageChoice(data, **kw)


_WATCHED: list[Path] = []  # folders whose listing or opening is recorded in _SEEN
_SEEN: list[str] = []


def _audit(event: str, args: tuple) -> None:
    """Every listing (os.scandir, os.listdir: os.walk, glob and Path.iterdir use them) and every
    open() of a path inside a watched folder. Without the file names a listing gives, no image
    of the folder can be decoded either. (An audit hook stays for the process: it only records.)"""
    if _WATCHED and event in ("open", "os.scandir", "os.listdir") and args and isinstance(args[0], (str, Path)):
        path = os.path.abspath(args[0])
        if any(path == str(w) or path.startswith(str(w) + os.sep) for w in _WATCHED):
            _SEEN.append(f"{event} {path}")


sys.addaudithook(_audit)


@pytest.fixture
def sealed(tmp_path):
    """train/: 10 + 7 images per class; val/ and test/ exist, and any listing or opening of
    them (or of anything inside) is recorded: the test then asserts nothing was."""
    root = write_image_folder(tmp_path / "sealed", train=10, val=3, size=16, phases=("train", "val", "test"))
    for f in sorted((root / "train" / "class_1").glob("*.png"))[:3]:  # an unequal second class
        f.unlink()
    _SEEN.clear()
    _WATCHED[:] = [(root / "val").resolve(), (root / "test").resolve()]
    yield root
    _WATCHED.clear()
    assert not _SEEN, f"val/ or test/ was read: {_SEEN[:3]}"


def test_the_inner_split_is_seeded_class_balanced_and_disjoint(sealed):
    sets = select_images(_choice(sealed, inner_val=0.3), TRANSFORMS, log=lambda s: None)
    assert set(sets) == {"train", "val"}
    train, val = sets["train"].samples, sets["val"].samples
    assert not set(train) & set(val)
    assert all(Path(p).parent.parent == sealed / "train" for p, _ in train + val)  # all from train/
    assert Counter(t for _, t in val) == {0: 3, 1: 2}  # round(0.3 * 10), round(0.3 * 7)
    assert len(train) + len(val) == 17
    again = select_images(_choice(sealed, inner_val=0.3), TRANSFORMS, log=lambda s: None)
    assert again["val"].samples == val  # seeded
    other = select_images(_choice(sealed, inner_val=0.3, split_seed=1), TRANSFORMS, log=lambda s: None)
    assert other["val"].samples != val
    assert sets["val"].transform is TRANSFORMS["val"] and sets["train"].transform is TRANSFORMS["train"]


def test_k_folds_score_every_training_image_once(sealed):
    vals = [select_images(_choice(sealed, folds=3, inner_fold=k), TRANSFORMS, log=lambda s: None)["val"].samples
            for k in range(3)]
    flat = [s for v in vals for s in v]
    assert len(flat) == len(set(flat)) == 17
    assert all(Counter(t for _, t in v)[0] >= 3 and Counter(t for _, t in v)[1] >= 2 for v in vals)


def test_an_inner_run_is_not_mistaken_for_a_real_one(tmp_path):
    """Its data fingerprint differs from the real run's (resume refuses to mix them) and its
    feature cache entries are keyed by the files they hold (tl/engine/feature_store.cache_key)."""
    root = write_image_folder(tmp_path / "d", train=6, val=6, size=16)
    real = select_images(_choice(root), TRANSFORMS, log=lambda s: None)
    inner = select_images(_choice(root, inner_val=0.5), TRANSFORMS, log=lambda s: None)
    assert records.data_fingerprint(real) != records.data_fingerprint(inner)


@pytest.mark.parametrize("kw, words", [({"inner_val": 0.2}, "at least 2"), ({"folds": 3}, "at least --folds 3"),
                                       ({"inner_val": 1.0}, "between 0 and 1"), ({"folds": 1}, "at least 2")])
def test_too_small_a_class_or_a_bad_fraction_is_refused(tmp_path, kw, words):
    root = write_image_folder(tmp_path / "d", train=1, val=2, size=16)
    with pytest.raises(TLError, match=words):
        select_images(_choice(root, **kw), TRANSFORMS, log=lambda s: None)


def test_inner_split_alone():
    samples = [(f"/d/a/{i}.png", 0) for i in range(10)] + [(f"/d/b/{i}.png", 1) for i in range(4)]
    train, val = inner_split(samples, ["a", "b"], fraction=0.2)
    assert Counter(t for _, t in val) == {0: 2, 1: 1} and len(train) == 11
