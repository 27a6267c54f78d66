"""tl/engine/predict.py: photos without labels are read as training reads them."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import main
from tests.conftest import write_image_folder
from tl.data import build_transforms
from tl.engine.evaluate import evaluate
from tl.engine.images import CheckedImageFolder, load_rgb
from tl.engine.model_loading import context_for, load_model
from tl.engine.predict import predict_images
from tl.models import get_backbone

ORIENTATION = 0x0112  # the EXIF tag
# What each Orientation value asks a viewer to do to the stored pixels (H, W, 3), written out in numpy
UPRIGHT = {2: np.fliplr, 3: lambda a: np.rot90(a, 2), 4: np.flipud, 5: lambda a: np.swapaxes(a, 0, 1),
           6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(a, 2).swapaxes(0, 1), 8: lambda a: np.rot90(a, 1)}


# ----------------------------------------------------------------------------- EXIF orientation
def _tagged_photos(folder: Path) -> list[str]:
    """For every Orientation 2..8, as JPEG and as PNG: `<o>-<fmt>-tagged` (stored pixels + the tag),
    `-stored.png` (the same pixels, no tag) and `-upright.png` (the pixels turned as the tag says, no
    tag). Stored 48 wide and 32 tall, in 8-pixel blocks of the tiny data's colours. Returns the stems."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(5)
    colours = np.array([(200, 40, 40), (40, 40, 200), (40, 200, 40), (230, 230, 230)], dtype=np.uint8)
    stems = []
    for o, turn in UPRIGHT.items():
        for fmt, ext in (("JPEG", "jpg"), ("PNG", "png")):
            blocks = colours[rng.integers(0, len(colours), (4, 6))]
            pixels = np.kron(blocks, np.ones((8, 8, 1), dtype=np.uint8))
            exif = Image.Exif()
            exif[ORIENTATION] = o
            stem = f"{o}-{ext}"
            Image.fromarray(pixels).save(folder / f"{stem}-tagged.{ext}", fmt, exif=exif)
            with Image.open(folder / f"{stem}-tagged.{ext}") as img:
                stored = np.asarray(img.convert("RGB"))  # the decoded pixels, as the file stores them
            Image.fromarray(stored).save(folder / f"{stem}-stored.png")
            Image.fromarray(np.ascontiguousarray(turn(stored))).save(folder / f"{stem}-upright.png")
            stems.append(stem)
    return stems


@pytest.fixture
def tiny_run(tmp_path, tiny_backbone) -> Path:
    """A one-epoch --quick run of the tiny backbone on the tiny colour data (64-pixel images)."""
    data = write_image_folder(tmp_path / "data")
    assert main.main(["-e", "resnet_scratch", "-b", "tiny", "--data", str(data), "--quick", "--out",
                      str(tmp_path / "runs"), "--no-progress"]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    return run_dir


def _same_and_different(p: dict[str, np.ndarray], stems: list[str]) -> None:
    """Each tagged photo's probabilities are its upright copy's, bit for bit (the same pixels, in a
    batch of one), and not its stored pixels' (an untrained-looking model: they differ in the 5th digit)."""
    for stem in stems:
        tagged, upright, stored = (p[f"{stem}-{kind}"] for kind in ("tagged", "upright", "stored"))
        assert tagged.tolist() == upright.tolist(), stem
        assert np.abs(tagged - stored).max() > 1e-7, stem  # so that reading the stored pixels shows


def test_every_reader_of_photos_turns_them_upright_by_their_exif_tag(tiny_run, tmp_path):
    """--predict DIR, --predict IMG and --evaluate read a photo with an Orientation tag (each of
    2..8, JPEG and PNG) as its upright copy, not as the pixels the file stores."""
    photos = tmp_path / "photos"
    stems = _tagged_photos(photos)
    table = tmp_path / "table.csv"
    assert main.main(["--predict", str(photos), "--checkpoint", str(tiny_run / "best.pth"), "--csv", str(table),
                      "--batch-size", "1", "--workers", "0", "--no-progress"]) == 0
    rows = pd.read_csv(table)
    assert len(rows) == 3 * len(stems)
    _same_and_different({Path(r.path).stem: np.array([r.p_class_0, r.p_class_1]) for r in rows.itertuples()}, stems)

    ctx = context_for(tiny_run / "best.pth", None)
    model, spec = load_model(tiny_run / "best.pth", ctx, 2), get_backbone("tiny")
    files = sorted(photos.iterdir())
    named = predict_images(model, files, ctx.classes, spec.mean, spec.std, ctx.image_size, top=2)  # --predict IMG
    _same_and_different({path.stem: np.array([dict(top)[c] for c in ctx.classes]) for path, top in named}, stems)

    split = tmp_path / "split"  # --evaluate: the photos as one class of a split
    (split / "class_0").mkdir(parents=True)
    for f in files:
        shutil.copy(f, split / "class_0" / f.name)
    write_image_folder(tmp_path / "other", classes=2, train=1, phases=("train",))
    (tmp_path / "other" / "train" / "class_1").rename(split / "class_1")
    ds = CheckedImageFolder(split, build_transforms(spec.mean, spec.std, size=ctx.image_size, augment=False)["val"])
    result = evaluate(model, torch.utils.data.DataLoader(ds, batch_size=1), torch.device("cpu"), 2)
    scored = {Path(path).stem: result["probabilities"][i].numpy() for i, (path, _) in enumerate(ds.samples)}
    _same_and_different(scored, stems)


MEAN = STD = (0.5, 0.5, 0.5)


def test_a_single_logit_head_gives_both_classes(tmp_path):
    from tl.engine.predict import classify, table_text

    photos = write_image_folder(tmp_path / "photos", train=2, phases=("train",))
    files = sorted(str(p) for p in photos.rglob("*.png"))
    torch.manual_seed(0)
    one_logit = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 1))
    probabilities, failed = classify(one_logit, files, build_transforms(MEAN, STD, size=8, augment=False)["val"],
                                     progress=False)
    assert not failed and len(probabilities) == 4
    with torch.no_grad():
        logit = one_logit(build_transforms(MEAN, STD, size=8, augment=False)["val"](load_rgb(files[0]))[None])[0, 0]
    assert probabilities[0].tolist() == pytest.approx([1 - torch.sigmoid(logit).item(), torch.sigmoid(logit).item()])
    rows = pd.read_csv(io.StringIO(table_text(photos, files, probabilities, ["cat", "dog"])))
    assert list(rows.columns) == ["path", "prediction", "p_cat", "p_dog"]
    assert rows[["p_cat", "p_dog"]].sum(axis=1).tolist() == pytest.approx([1.0] * 4, abs=1e-6)


