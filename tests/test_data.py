"""Data: transforms, folder checks with clear messages, what counts as an image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import write_image_folder
from tl import TLError
from tl.data import build_transforms, make_loaders
from tl.engine.images import check_layout, load_rgb
from tl.engine.selection import describe_skipped, image_datasets

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def test_transforms_shapes_and_normalisation():
    t = build_transforms(MEAN, STD)
    img = Image.fromarray(np.full((300, 400, 3), 255, np.uint8))
    val = t["val"](img)
    assert val.shape == (3, 224, 224) and val.dtype == torch.float32
    assert torch.allclose(val, torch.ones_like(val))  # white -> (1 - 0.5) / 0.5
    assert t["train"](img).shape == (3, 224, 224)
    noaug = build_transforms(MEAN, STD, augment=False)
    assert torch.equal(noaug["train"](img), noaug["val"](img))


def test_val_transform_resizes_shorter_side_then_crops_centre():
    # a 512x256 image whose left and right quarters are black: after Resize(256) it stays
    # 512x256, the central 224 crop sees only the white middle. (003's crop-then-resize would not.)
    pixels = np.zeros((256, 512, 3), np.uint8)
    pixels[:, 128:384] = 255
    out = build_transforms((0, 0, 0), (1, 1, 1))["val"](Image.fromarray(pixels))
    assert out.min().item() == pytest.approx(1.0)


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


def test_max_per_class_and_deterministic_shuffle(tiny_data):
    t = build_transforms(MEAN, STD, size=32, resize=36, augment=False)
    sets = image_datasets(tiny_data, t, max_per_class=3)
    assert sorted(sets["train"].targets) == [0, 0, 0, 1, 1, 1]

    def order(seed):  # the indices the train loader draws in its first two epochs
        loader = make_loaders(sets, 2, seed=seed)["train"]
        return [list(loader.batch_sampler), list(loader.batch_sampler)]

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert order(1)[0] != order(1)[1]  # reshuffled every epoch
    assert len(sets["val"]) == 6
