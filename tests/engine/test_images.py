"""tl/engine/images.py: which files of a data folder are samples, and with which label."""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import write_image_folder
from tl import TLError
from tl.data import build_transforms
from tl.engine import images
from tl.engine.images import CheckedImageFolder, check_layout, load_rgb
from tl.engine.selection import describe_skipped, image_datasets

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _sets(root, **kwargs):
    return image_datasets(root, build_transforms(MEAN, STD, size=32), **kwargs)


def _names(ds, root) -> set[tuple[str, str]]:
    """The samples as (path relative to the split, class name)."""
    return {(os.path.relpath(path, Path(root) / "train"), ds.classes[label]) for path, label in ds.samples}


# ----------------------------------------------------------------------------- links that leave the data folder
def _data_with_siblings(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """data/ and siblings whose names begin with "data" (data2/, data-old/, data_backup/), with
    links from data/train/class_0/ into each sibling, and one into data/ itself outside any split.
    Returns (data, {link under train/: the real file it leads to, for the links that leave data/})."""
    d = write_image_folder(tmp_path / "data")
    for name in ("data2", "data-old", "data_backup"):
        write_image_folder(tmp_path / name, classes=1, train=2, phases=("train",))
    (d / "extra").mkdir()
    shutil.copy(d / "train" / "class_1" / "000.png", d / "extra" / "kept.png")
    c0 = d / "train" / "class_0"
    (c0 / "from_data2.png").symlink_to(Path("..", "..", "..", "data2", "train", "class_0", "000.png"))  # relative
    (c0 / "from_old.png").symlink_to(tmp_path / "data-old" / "train" / "class_0" / "001.png")  # absolute
    (c0 / "backup").symlink_to(tmp_path / "data_backup" / "train" / "class_0")  # a folder link: 2 files
    (c0 / "kept.png").symlink_to(Path("..", "..", "extra", "kept.png"))  # inside data/, in no split: class_0's
    real = lambda *parts: os.path.realpath(tmp_path.joinpath(*parts))  # noqa: E731
    leaving = {"class_0/from_data2.png": real("data2", "train", "class_0", "000.png"),
               "class_0/from_old.png": real("data-old", "train", "class_0", "001.png"),
               "class_0/backup/000.png": real("data_backup", "train", "class_0", "000.png"),
               "class_0/backup/001.png": real("data_backup", "train", "class_0", "001.png")}
    return d, leaving


@pytest.mark.parametrize("given", ["data", "data/", "a link to data", "data given as data/train/../"])
def test_a_sibling_folder_whose_name_begins_like_the_data_folder_is_outside_it(tmp_path, given):
    """data2/, data-old/ and data_backup/ lie beside data/, not in it: files reached through links
    into them are left out and listed (`outside`), and taken only with follow_links. A link to a file
    of data/ outside any split stays in. However the data folder is named, the answer is the same."""
    d, leaving = _data_with_siblings(tmp_path)
    (tmp_path / "alias").symlink_to(d)
    root = {"data": str(d), "data/": str(d) + os.sep, "a link to data": str(tmp_path / "alias"),
            "data given as data/train/../": str(d / "train" / "..")}[given]
    train = _sets(root)["train"]
    own = {(f"class_{k}/{i:03d}.png", f"class_{k}") for k in (0, 1) for i in range(12)}
    assert _names(train, root) == own | {("class_0/kept.png", "class_0")}
    assert {os.path.relpath(p, Path(root) / "train"): real for p, real in train.outside} == leaving
    followed = _sets(root, follow_links=True)["train"]
    assert _names(followed, root) == _names(train, root) | {(link, "class_0") for link in leaving}
    assert {os.path.relpath(p, Path(root) / "train") for p, _ in followed.outside} == set(leaving)


def test_a_link_to_the_data_folder_itself_is_inside_it_and_its_val_files_are_refused_in_train(tmp_path):
    """data/train/class_0/all -> data/: every file it reaches lies in data/ (none is `outside`), so
    val's files would become train samples of class_0 through it; one file in two splits is refused."""
    d = write_image_folder(tmp_path / "data")
    (d / "train" / "class_0" / "all").symlink_to(Path("..", ".."))
    with pytest.raises(Exception, match=r"12 file\(s\) belong to two splits") as caught:
        _sets(d)
    assert type(caught.value).__name__ == "TLError"
    train = images.CheckedImageFolder(d / "train", within=d)
    assert train.outside == [] and len(train.samples) == 24 + 12  # its own 24, and val's 12 through the link


# ----------------------------------------------------------------------------- links inside one split
def _split_with_links(tmp_path: Path, case: str) -> tuple[Path, dict[str, str]]:
    """A split with three classes (ant, ants, bees: two names that begin alike), 4 files each, and
    one kind of link or second name inside it. Returns (data, {expected sample: its class})."""
    d = write_image_folder(tmp_path / "d", classes=3, train=4, val=4)
    for phase in ("train", "val"):
        for k, name in enumerate(("ant", "ants", "bees")):
            (d / phase / f"class_{k}").rename(d / phase / name)
    t = d / "train"
    expected = {f"{name}/{i:03d}.png": name for name in ("ant", "ants", "bees") for i in range(4)}
    if case == "a link to another class":
        (t / "bees" / "linked.png").symlink_to(Path("..", "ants", "001.png"))
    elif case == "a link met before its target":  # ant/ is scanned before ants/
        (t / "ant" / "linked.png").symlink_to(t / "ants" / "002.png")
    elif case == "a link within its class":
        (t / "bees" / "again.png").symlink_to("003.png")
    elif case == "a chain of two links":  # bees/ -> ant/ (a link) -> ants/ (the file)
        (t / "ant" / "hop.png").symlink_to(Path("..", "ants", "000.png"))
        (t / "bees" / "chain.png").symlink_to(Path("..", "ant", "hop.png"))
    elif case == "a folder link to another class":
        (t / "bees" / "more").symlink_to(Path("..", "ant"))
    elif case == "a hard link within its class":
        os.link(t / "ants" / "000.png", t / "ants" / "hard.png")
    elif case == "a hard link in another class":  # one file, really in two classes: no single label
        os.link(t / "ant" / "000.png", t / "bees" / "hard.png")
        del expected["ant/000.png"]
    return d, expected


@pytest.mark.parametrize("case", ["a link to another class", "a link met before its target", "a link within its class",
                                  "a chain of two links", "a folder link to another class",
                                  "a hard link within its class", "a hard link in another class"])
def test_a_file_reached_under_two_names_in_one_split_counts_once_with_the_label_of_its_folder(tmp_path, case):
    """A link inside a split (bees/x.png -> ../ants/y.png) adds no sample and moves none: the file
    is one sample, of the class folder it really lies in (ants, not ant, whose name begins alike),
    and its other name is listed as a duplicate; a file that really lies in two classes (a hard link)
    has no single label and is left out."""
    d, expected = _split_with_links(tmp_path, case)
    train = _sets(d)["train"]
    assert train.classes == ["ant", "ants", "bees"]
    assert _names(train, d) == set(expected.items())
    assert len(train.samples) == len(expected) and len(train.targets) == len(expected)
    assert [train.classes[t] for t in train.targets] == [expected[os.path.relpath(p, d / "train")]
                                                         for p, _ in train.samples]
    reals = [os.path.realpath(p) for p, _ in train.samples]
    assert len(set(reals)) == len(reals)
    other_names = {os.path.relpath(p, d / "train") for p, _ in train.duplicates}
    other_names |= {os.path.relpath(p, d / "train") for p, why in train.skipped if "ambiguous" in why}
    added = {"a link to another class": {"bees/linked.png"}, "a link met before its target": {"ant/linked.png"},
             "a link within its class": {"bees/again.png"}, "a chain of two links": {"ant/hop.png", "bees/chain.png"},
             "a folder link to another class": {f"bees/more/{i:03d}.png" for i in range(4)},
             "a hard link within its class": {"ants/hard.png"},
             "a hard link in another class": {"ant/000.png", "bees/hard.png"}}[case]
    assert other_names == added


def test_lies_in_compares_names_up_to_a_separator():
    from tl.engine.images import lies_in

    inside = [("/d/data/x.png", "/d/data"), ("/d/data/a/b.png", "/d/data/"), ("/x.png", "/")]
    outside = [("/d/data2/x.png", "/d/data"), ("/d/data-old/x.png", "/d/data"), ("/d/data_backup/x", "/d/data"),
               ("/d/data", "/d/data"), ("/d/ants/1.png", "/d/ant"), ("/d/dat/x.png", "/d/data")]
    assert all(lies_in(real, folder) for real, folder in inside)
    assert not any(lies_in(real, folder) for real, folder in outside)


GREY = (0.5, 0.5, 0.5)  # the mean and the std the tests below normalise with


def _mode_image(mode: str) -> tuple[Image.Image, str, np.ndarray]:
    """(image in `mode`, file suffix, the RGB pixels it must become) for a 1x4 strip."""
    if mode == "I":  # 32-bit integer, values 0..255: not all black
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


def header_only_png(path: Path, width: int, height: int) -> Path:
    """A PNG that *declares* width x height 1-bit pixels and holds no pixel data (a few dozen bytes)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return path


def test_decompression_bombs_are_skipped_before_decoding(tmp_path, capsys):
    d = write_image_folder(tmp_path / "d")
    folder = d / "train" / "class_0"
    Image.new("1", (100000, 1)).save(folder / "strip.png")  # a few hundred bytes, 19.7 GB once resized
    Image.new("1", (20000, 2)).save(folder / "thin.png")
    header_only_png(folder / "huge.png", 12000, 12000)  # 144 M pixels declared in 57 bytes
    assert (folder / "strip.png").stat().st_size < 1000
    sets = image_datasets(d, build_transforms(GREY, GREY, size=32))
    assert len(sets["train"]) == 24
    report = describe_skipped(sets)
    assert "strip.png: extreme aspect ratio 100000x1" in report and "thin.png: extreme aspect ratio" in report
    assert "huge.png: too many pixels" in report
    with pytest.raises(images.UnusableImage, match="extreme aspect ratio"):  # --predict reads through the guard too
        load_rgb(folder / "strip.png")


def test_layout_errors_are_clear(tmp_path):
    with pytest.raises(TLError, match="data folder not found"):
        check_layout(tmp_path / "nope")
    write_image_folder(tmp_path / "a", phases=("train",))
    with pytest.raises(TLError, match="missing phase folder.*val"):
        check_layout(tmp_path / "a")
    write_image_folder(tmp_path / "b")
    (tmp_path / "b" / "val" / "class_2").mkdir()
    with pytest.raises(TLError, match="holds no image files"):
        check_layout(tmp_path / "b")
    write_image_folder(tmp_path / "c")
    (tmp_path / "c" / "val" / "class_1").rename(tmp_path / "c" / "val" / "other")
    with pytest.raises(TLError, match="class folders differ"):
        check_layout(tmp_path / "c")


def test_flat_class_folders_get_a_layout_hint(tmp_path):
    write_image_folder(tmp_path / "x", phases=("train",))
    with pytest.raises(TLError, match="no train/val split"):
        check_layout(tmp_path / "x" / "train")


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "I;16", "LA"])
def test_every_image_mode_loads_as_rgb(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray((np.arange(600).reshape(20, 30) * 100).astype(np.uint16))
    else:
        img = rgb.convert(mode)
    path = tmp_path / ("img.tiff" if mode in ("I;16", "CMYK") else "img.png")
    img.save(path)
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == (30, 20)
    if mode == "I;16":
        assert np.asarray(out).max() > 200  # rescaled, not clipped to a white/black image


ORIENTATION = 0x0112  # the EXIF tag: 6 = "turn 90 degrees clockwise to view"


def _save_turned(pixels: np.ndarray, path, fmt: str, **options) -> None:
    """The pixels as a phone stores them: turned a quarter left, with Orientation 6 saying how to turn back."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    Image.fromarray(pixels).transpose(Image.Transpose.ROTATE_90).save(path, fmt, exif=exif, **options)


def _upright(seed: int = 0, size=(30, 20)) -> np.ndarray:
    """(H, W, 3) pixels of a photo taken in portrait: 20 wide, 30 tall, no symmetry."""
    return np.random.default_rng(seed).integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)


def test_a_turned_png_with_its_orientation_tag_reads_as_the_upright_photo(tmp_path):
    pixels = _upright()
    for k in range(2):  # a data set: class_0 holds the upright photo, class_1 the turned one
        (tmp_path / "train" / f"class_{k}").mkdir(parents=True)
    Image.fromarray(pixels).save(tmp_path / "train" / "class_0" / "upright.png")
    _save_turned(pixels, tmp_path / "train" / "class_1" / "turned.png", "PNG")
    with Image.open(tmp_path / "train" / "class_1" / "turned.png") as stored:
        assert stored.size == (30, 20)  # as stored: landscape
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "train" / "class_1" / "turned.png")), pixels)
    # what training, the caches and --evaluate read: the same tensor for both files
    ds = CheckedImageFolder(tmp_path / "train", build_transforms(GREY, GREY, size=16, augment=False)["val"])
    assert torch.equal(ds[0][0], ds[1][0])


def test_a_turned_jpeg_reads_upright(tmp_path):
    pixels = np.kron(_upright(1, (6, 4)), np.ones((8, 8, 1), dtype=np.uint8))  # 8x8 blocks survive JPEG
    _save_turned(pixels, tmp_path / "turned.jpg", "JPEG", quality=95, subsampling=0)
    read = np.asarray(load_rgb(tmp_path / "turned.jpg")).astype(int)
    assert read.shape == pixels.shape
    assert np.abs(read - pixels).mean() < 3 < np.abs(read - pixels[::-1, ::-1]).mean()  # upright, not upside down


