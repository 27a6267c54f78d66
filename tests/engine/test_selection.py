"""tl/engine/selection.py: which files a data set holds (images only, each with one label, none in
two splits, broken and non-image files skipped and named), the seeded draws (nested
--train-per-class, a fraction of a class) and the inner split and folds that tuning carves from
train."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

import main
from tests.conftest import write_image_folder
from tl import TLError
from tl.data import build_transforms
from tl.engine import run_folder
from tl.engine.selection import ImageChoice, describe_skipped, image_datasets, inner_split, nested_draw, select_images

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_a_val_symlink_to_a_train_file_is_the_same_file(tmp_path):
    root = write_image_folder(tmp_path / "data", train=2, val=1, size=16)
    target = root / "train" / "class_0" / "000.png"
    (root / "val" / "class_0" / "linked.png").symlink_to(target)
    transforms = build_transforms(IMAGENET_MEAN, IMAGENET_STD, size=8, augment=False)
    with pytest.raises(TLError, match="two splits"):
        image_datasets(root, transforms)


def test_the_skip_report_names_broken_files_of_every_split(tmp_path):
    root = write_image_folder(tmp_path / "data", train=2, val=2, size=16, phases=("train", "val", "test"))
    broken = {phase: root / phase / f"class_{i % 2}" / "broken.png"
              for i, phase in enumerate(("train", "val", "test"))}
    for path in broken.values():
        path.write_bytes(b"not a picture")
    sets = image_datasets(root, build_transforms(IMAGENET_MEAN, IMAGENET_STD, size=8, augment=False),
                          phases=("train", "val", "test"))
    report = describe_skipped(sets)
    assert report is not None
    for phase, path in broken.items():
        assert str(path) in report, phase


MEAN = STD = (0.5, 0.5, 0.5)


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


def test_non_images_are_not_samples_and_bad_images_are_reported(tiny_data):
    ants = tiny_data / "train" / "class_0"
    (ants / ".DS_Store").write_bytes(b"\0\1")
    (ants / "notes.txt").write_text("not an image")
    Image.new("RGB", (8, 8)).save(ants / "imageNotFound.gif")
    (ants / "empty.jpg").write_bytes(b"")
    (ants / "fake.jpg").write_text("<html>not a jpeg</html>")
    sets = image_datasets(tiny_data, build_transforms(MEAN, STD, size=32, resize=36))
    paths = [p for p, _ in sets["train"].samples]
    assert len(paths) == 24 and not any(p.endswith((".gif", ".txt", ".DS_Store", "empty.jpg", "fake.jpg"))
                                        for p in paths)
    report = describe_skipped(sets)
    assert "skipped 2 unusable" in report and "empty file" in report and "fake.jpg" in report


def test_a_truncated_image_is_skipped_by_the_scan_and_never_replaced(tiny_data):
    good = tiny_data / "train" / "class_0" / "000.png"
    img = Image.open(good).resize((200, 200))
    img.save(tiny_data / "train" / "class_0" / "big.jpg", quality=95)
    data = (tiny_data / "train" / "class_0" / "big.jpg").read_bytes()
    (tiny_data / "train" / "class_0" / "big.jpg").write_bytes(data[: len(data) // 2])  # header intact
    sets = image_datasets(tiny_data, build_transforms(MEAN, STD, size=32, resize=36))
    paths = [p for p, _ in sets["train"].samples]
    assert len(paths) == 24 and str(tiny_data / "train" / "class_0" / "big.jpg") not in paths
    assert "big.jpg: OSError: image file is truncated" in describe_skipped(sets)
    # a file that breaks after the scan stops the run with its name: no other image takes its place
    good.write_bytes(data[: len(data) // 2])
    with pytest.raises(TLError, match="cannot decode .*000.png.*--verify-images"):
        sets["train"][paths.index(str(good))]


def test_nested_draw_is_class_balanced_nested_and_seeded():
    samples = [(f"c{k}/{i:03d}.png", k) for k in range(3) for i in range(30)]
    classes = ["a", "b", "c"]
    draws = {n: nested_draw(samples, classes, n, seed=0) for n in (2, 5, 10, 25)}
    for n, draw in draws.items():
        assert [t for _, t in draw].count(0) == [t for _, t in draw].count(2) == n  # balanced
    for small, large in ((2, 5), (5, 10), (10, 25)):
        assert set(draws[small]) < set(draws[large])  # nested: more images only add images
    assert draws[5] != [s for s in samples if int(s[0][3:6]) < 5]  # not the first files by name
    assert nested_draw(samples, classes, 5, seed=1) != draws[5]  # the seed draws another subset
    assert nested_draw(list(reversed(samples)), classes, 5, seed=0) == draws[5]  # the order given does not matter
    with pytest.raises(Exception, match="fewer than the 31 per class"):
        nested_draw(samples, classes, 31)


def test_a_seeded_fraction_of_a_class_is_kept_for_training_only(tmp_path):
    from tl.engine.selection import ImageChoice, fraction_draw, nested_draw, select_images

    samples = [(f"c{k}/{i:03d}.png", k) for k in range(2) for i in range(30)]
    kept = fraction_draw(samples, ["cat", "dog"], {"cat": 0.1}, seed=0)
    cats = [s for s in kept if s[1] == 0]
    assert len(cats) == 3 and [s for s in kept if s[1] == 1] == samples[30:]  # 10% of the cats, every dog
    assert set(cats) == set(nested_draw(samples, ["cat", "dog"], 3, seed=0)[:3])  # the start of the nested draw
    assert fraction_draw(samples, ["cat", "dog"], {"cat": 0.1}, seed=1) != kept  # seeded
    assert len(fraction_draw(samples, ["cat", "dog"], {"cat": 0.001})) == 31  # at least one image
    with pytest.raises(TLError, match="names cow, not a class"):
        fraction_draw(samples, ["cat", "dog"], {"cow": 0.5})
    data = write_image_folder(tmp_path / "data", train=10, val=4, phases=("train", "val", "test"))
    transforms = build_transforms(MEAN, STD, size=16, augment=False)
    sets = select_images(ImageChoice(data, train_fraction={"class_1": 0.2}), transforms, log=lambda s: None)
    assert [sets["train"].targets.count(k) for k in (0, 1)] == [10, 2]
    assert len(sets["val"]) == len(sets["test"]) == 8  # untouched
    args = main.build_parser().parse_args(["-e", "resnet_frozen", "--train-fraction", "class_1=0.2"])
    assert args.train_fraction == {"class_1": 0.2}


TRANSFORMS = build_transforms((0.5,) * 3, (0.5,) * 3, size=16, augment=False)


def _choice(data: Path, **kw) -> ImageChoice:
    return ImageChoice(data, **kw)


@pytest.mark.usefixtures("own_cache_dir")
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


@pytest.mark.usefixtures("own_cache_dir")
def test_k_folds_score_every_training_image_once(sealed):
    vals = [select_images(_choice(sealed, folds=3, inner_fold=k), TRANSFORMS, log=lambda s: None)["val"].samples
            for k in range(3)]
    flat = [s for v in vals for s in v]
    assert len(flat) == len(set(flat)) == 17
    assert all(Counter(t for _, t in v)[0] >= 3 and Counter(t for _, t in v)[1] >= 2 for v in vals)


@pytest.mark.usefixtures("own_cache_dir")
def test_an_inner_run_is_not_mistaken_for_a_real_one(tmp_path):
    """Its data fingerprint differs from the real run's (resume refuses to mix them) and its
    feature cache entries are keyed by the files they hold (tl/engine/feature_store.cache_key)."""
    root = write_image_folder(tmp_path / "d", train=6, val=6, size=16)
    real = select_images(_choice(root), TRANSFORMS, log=lambda s: None)
    inner = select_images(_choice(root, inner_val=0.5), TRANSFORMS, log=lambda s: None)
    assert run_folder.data_fingerprint(real) != run_folder.data_fingerprint(inner)


@pytest.mark.usefixtures("own_cache_dir")
@pytest.mark.parametrize("kw, words", [({"inner_val": 0.2}, "at least 2"), ({"folds": 3}, "at least --folds 3"),
                                       ({"inner_val": 1.0}, "between 0 and 1"), ({"folds": 1}, "at least 2")])
def test_too_small_a_class_or_a_bad_fraction_is_refused(tmp_path, kw, words):
    root = write_image_folder(tmp_path / "d", train=1, val=2, size=16)
    with pytest.raises(TLError, match=words):
        select_images(_choice(root, **kw), TRANSFORMS, log=lambda s: None)


@pytest.mark.usefixtures("own_cache_dir")
def test_inner_split_alone():
    samples = [(f"/d/a/{i}.png", 0) for i in range(10)] + [(f"/d/b/{i}.png", 1) for i in range(4)]
    train, val = inner_split(samples, ["a", "b"], fraction=0.2)
    assert Counter(t for _, t in val) == {0: 2, 1: 1} and len(train) == 11


