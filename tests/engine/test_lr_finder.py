"""The learning-rate range test (`--find-lr`, tl/engine/lr_finder.py): a geometric sweep through
the one loop, its stop on divergence, the suggestion, train only, and no window where the
lowest loss lies at an edge of the sweep. Tiny images and the tiny backbone: seconds."""

from __future__ import annotations

import csv
import functools
import math
import os
import shutil
import types

import pytest

from experiments.recipes import resnet_frozen
from tl.engine import lr_finder
from tl.engine.options import RunOptions

pytestmark = pytest.mark.usefixtures("own_cache_dir")


def _find(tiny_data, pretrained, out, recipe=resnet_frozen, build=None, **kw):
    opts = RunOptions(data=tiny_data, backbone="tiny", weights=str(pretrained), batch_size=4, workers=0,
                      image_size=32, out=out, progress=False)
    return lr_finder.find_lr(recipe.RECIPE, build or recipe.build, opts, log=lambda _: None, **kw)


# ----------------------------------------------------------------------------- the range test
def test_the_rate_grows_geometrically_per_step_through_the_one_loop(tiny_data, pretrained, tmp_path, monkeypatch):
    calls = []
    real = lr_finder.train_model
    monkeypatch.setattr(lr_finder, "train_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    result = _find(tiny_data, pretrained, tmp_path / "out", start_lr=1e-6, end_lr=1e-4, steps=12)
    t = result.test
    assert calls == [1]  # one call of the one loop
    assert len(t.lrs) == 12 and not t.diverged  # 6 train batches per epoch: it ran on into a second epoch
    ratios = [b / a for a, b in zip(t.lrs, t.lrs[1:])]
    assert t.lrs[0] == pytest.approx(1e-6) and t.lrs[-1] == pytest.approx(1e-4)
    assert ratios == pytest.approx([100 ** (1 / 11)] * 11)  # the same factor every step
    assert result.group == "head" and result.recipe_lr == 1e-3
    rows = list(csv.DictReader((result.folder / "lr_finder.csv").open()))
    assert [float(r["lr"]) for r in rows] == pytest.approx(t.lrs) and len(rows) == 12
    assert (result.folder / "lr_finder.png").stat().st_size > 0
    assert sorted(p.name for p in result.folder.iterdir()) == ["lr_finder.csv", "lr_finder.png"]  # not a run
    assert result.folder.parent == tmp_path / "out" and result.folder.name.startswith("lr-finder-resnet_frozen-tiny-")


def test_a_huge_end_rate_diverges_and_stops_before_the_planned_steps(tiny_data, pretrained, tmp_path):
    # class 1's training images are copies of class 0's: no rate takes the loss below log 2 (the colours
    # alone would let ever larger weights drive it to zero), so large steps make it explode
    for f in (tiny_data / "train" / "class_1").iterdir():
        shutil.copy(tiny_data / "train" / "class_0" / f.name, f)
    result = _find(tiny_data, pretrained, tmp_path / "out", start_lr=1e-4, end_lr=1e8, steps=40)
    t = result.test
    assert t.diverged and len(t.lrs) < 40
    assert t.smoothed[-1] > 4 * min(t.smoothed) and all(s <= 4 * min(t.smoothed) for s in t.smoothed[:-1])


def test_ratios_between_groups_are_kept(tiny_data, pretrained, tmp_path):
    from experiments.recipes import two_stage  # first stage: body 2e-4, neck 2e-4, head 2e-3 (and BatchNorm)

    result = _find(tiny_data, pretrained, tmp_path / "out", recipe=two_stage, start_lr=1e-5, end_lr=1e-3, steps=5)
    assert result.stage == "frozen body" and result.group == "head" and result.recipe_lr == 2e-3
    opt = result.test.optimizer
    rates = {g["name"]: g["lr"] for g in opt.param_groups}
    assert rates["body"] / rates["head"] == pytest.approx(0.1)


def test_the_suggestion_is_a_tenth_of_the_rate_at_the_lowest_smoothed_loss():
    lrs = [10 ** (-7 + 8 * i / 99) for i in range(100)]
    # a valley whose floor is at 1e-2 (log10 = -2), rising steeply after it
    smoothed = [2 + (math.log10(lr) + 2) ** 2 * (1 if lr < 1e-2 else 5) for lr in lrs]
    smoothed[-1] = math.nan  # a diverged last point is ignored
    rate, best = lr_finder.suggestion(lrs, smoothed)
    assert lrs[best] == pytest.approx(1e-2, rel=0.1) and rate == pytest.approx(lrs[best] / 10)
    with pytest.raises(lr_finder.TLError):
        lr_finder.suggestion([1e-3], [math.inf])


def test_the_range_test_never_reads_val_or_test(tiny_data, pretrained, tmp_path, monkeypatch):
    from PIL import Image

    from tests.conftest import write_image_folder

    write_image_folder(tiny_data, phases=("test",))
    for split in ("val", "test"):  # broken files: a scan or a read of them would stop the run
        for f in (tiny_data / split).rglob("*.png"):
            f.write_bytes(b"not an image")
    opened, real_open = [], Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(str(fp)) or real_open(fp, *a, **k))
    result = _find(tiny_data, pretrained, tmp_path / "out", start_lr=1e-5, end_lr=1e-3, steps=3)
    assert len(result.test.lrs) == 3
    assert opened and all(os.sep + "train" + os.sep in p for p in opened)


# ----------------------------------------------------------------------------- the table of every recipe


def test_a_minimum_at_the_edge_of_the_sweep_is_said_to_be_no_window():
    from experiments import lr_table

    lrs = [1e-7 * 10 ** (i / 10) for i in range(50)]
    curve = functools.partial(types.SimpleNamespace, lrs=lrs, diverged=False)
    flat = curve(smoothed=[0.69 + 0.001 * i for i in range(50)])  # never fell
    dip = curve(smoothed=[0.69 - 0.01 * i if i < 30 else 0.4 + 0.1 * i for i in range(50)])
    ended = curve(smoothed=[0.69 - 0.01 * i for i in range(50)])  # still falling at the end
    assert [lr_finder.no_window(t) for t in (flat, dip, ended)] == ["first", None, "last"]
    # falling until the next step's loss overflowed (the loop's NonFiniteLoss: that step is not recorded): the
    # loss did turn up, at once, so the lowest point is the curve's turn, as when the NaN step is recorded
    overflowed = curve(smoothed=[0.69 - 0.01 * i for i in range(30)], lrs=lrs[:30], diverged=True)
    recorded = curve(smoothed=[0.69 - 0.01 * i for i in range(30)] + [math.nan], lrs=lrs[:31], diverged=True)
    assert lr_finder.no_window(overflowed) is None and lr_finder.no_window(recorded) is None
    one_step = curve(smoothed=[0.69], lrs=lrs[:1], diverged=True)  # diverged at the second step: no curve at all
    assert lr_finder.no_window(one_step) == "first"
    # lowest at the second or fourth rate (noise on a loss that does not fall): a tenth of that rate is below every
    # rate tested, so the suggestion is no more the curve's than at the first (results/lr_finder.md's resnet_scratch,
    # from random weights: lowest at 1.7e-07, the sweep's fourth rate)
    sweep = [1e-7 * (1e8 ** (1 / 99)) ** i for i in range(100)]
    for lowest in (1, 3):
        noisy = curve(lrs=sweep, smoothed=[0.69 + 0.001 * abs(i - lowest) for i in range(100)])
        assert lr_finder.no_window(noisy) == "first", lowest
    a_decade_on = curve(lrs=sweep, smoothed=[0.69 + 0.001 * abs(i - 14) for i in range(100)])  # 1.3e-6: a window
    assert lr_finder.no_window(a_decade_on) is None
    row = {"recipe": "resnet_scratch", "stage": "train", "group": "all", "documented_lr": 1e-4, "suggested_lr": 1e-8,
           "ratio": 1e-4, "steps": 50, "diverged": False, "no_window": "first", "status": "ok", "reason": ""}
    md = lr_table.page([row], {"command": "c", "machine": "m", "seconds": 1.0})
    assert "1.0e-08 (no window: lowest within a decade of the first rate)" in md and "*No window*" in md
    assert "*No window*" not in lr_table.page([{**row, "no_window": ""}], {"command": "c", "machine": "m",
                                                                           "seconds": 1.0})
