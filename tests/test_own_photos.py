"""Issue 22, "Your own photos, end to end": EXIF orientation in the one reader, a folder of
photos classified into a table, a classification report for every run and --evaluate, and
unbalanced classes (class weights, a balanced sampler, the imbalance study)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from tl.data import build_transforms
from tl.engine import feature_store, images
from tl.engine.images import CheckedImageFolder, load_rgb

MEAN = STD = (0.5, 0.5, 0.5)
ORIENTATION = 0x0112  # the EXIF tag: 6 = "turn 90 degrees clockwise to view"


def _upright(seed: int = 0, size=(30, 20)) -> np.ndarray:
    """(H, W, 3) pixels of a photo taken in portrait: 20 wide, 30 tall, no symmetry."""
    return np.random.default_rng(seed).integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)


def _save_turned(pixels: np.ndarray, path, fmt: str, **options) -> None:
    """The pixels as a phone stores them: turned a quarter left, with Orientation 6 saying how to turn back."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    Image.fromarray(pixels).transpose(Image.Transpose.ROTATE_90).save(path, fmt, exif=exif, **options)


# ----------------------------------------------------------------------------- EXIF orientation
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
    ds = CheckedImageFolder(tmp_path / "train", build_transforms(MEAN, STD, size=16, augment=False)["val"])
    assert torch.equal(ds[0][0], ds[1][0])


def test_a_turned_jpeg_reads_upright(tmp_path):
    pixels = np.kron(_upright(1, (6, 4)), np.ones((8, 8, 1), dtype=np.uint8))  # 8x8 blocks survive JPEG
    _save_turned(pixels, tmp_path / "turned.jpg", "JPEG", quality=95, subsampling=0)
    read = np.asarray(load_rgb(tmp_path / "turned.jpg")).astype(int)
    assert read.shape == pixels.shape
    assert np.abs(read - pixels).mean() < 3 < np.abs(read - pixels[::-1, ::-1]).mean()  # upright, not upside down


def test_the_feature_cache_key_names_the_reader(tiny_data, monkeypatch):
    ds = CheckedImageFolder(tiny_data / "val", build_transforms(MEAN, STD, size=16, augment=False)["val"])

    def key():
        return feature_store.cache_key("d", ds, views=1, random_views=False, seed=0, workers=0, dtype=torch.float32,
                                       device="cpu", channels_last=False, folded=False)

    before = key()
    monkeypatch.setattr(feature_store, "READER", images.READER + ", and something new")
    assert key() != before  # features stored by another reader are not found again
