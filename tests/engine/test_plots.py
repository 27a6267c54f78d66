"""Pictures are written headless and de-normalisation really inverts normalisation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import main
from tl.data import build_transforms
from tl.engine.plots import denormalize
from tl.engine.weights import build_model
from tl.models import format_parameter_table, get_backbone, set_trainable


def _png(path, min_width=300):
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width >= min_width
        return img.size


def test_denormalize_round_trips():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    pixels = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    normalised = build_transforms(mean, std, size=40, resize=40, augment=False)["val"](Image.fromarray(pixels))
    restored = denormalize(normalised, mean, std)
    assert torch.allclose(restored, torch.from_numpy(pixels).permute(2, 0, 1).float() / 255, atol=1e-5)
    # 001's im_convert, x * (mean + std), is not the inverse
    wrong = (normalised * (torch.tensor(mean) + torch.tensor(std)).view(3, 1, 1)).clamp(0, 1)
    assert not torch.allclose(wrong, restored, atol=0.05)


def test_every_run_folder_gets_its_pictures(tiny_data, tiny_backbone, tmp_path):
    assert main.main(["-e", "resnet_scratch", "-b", "tiny", "--data", str(tiny_data), "--quick",
                      "--out", str(tmp_path / "runs"), "--no-progress"]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    for name in ("curves.png", "confusion.png", "predictions.png", "top_losses.png"):
        _png(run_dir / name)


def test_show_data_writes_the_augmentation_preview_and_a_batch(tiny_data, tmp_path, capsys):
    assert main.main(["--show-data", "--data", str(tiny_data), "--out", str(tmp_path)]) == 0
    width, _ = _png(tmp_path / "data-preview" / "augmentation.png", min_width=900)  # 9 images in a row
    _png(tmp_path / "data-preview" / "batch.png")
    assert "augmentation.png" in capsys.readouterr().out


@pytest.mark.parametrize("backbone,groups,expected", [
    ("resnet18", ["head"], 1026), ("vgg16", ["head"], 8194), ("efficientnet_lite0", ["head"], 2562),
    ("resnet18", ["neck", "head"], 8_394_754),
])
def test_summary_counts_trainable_parameters(backbone, groups, expected):
    model = build_model(backbone, 2, "none")
    set_trainable(model, get_backbone(backbone), groups)
    table = format_parameter_table(model, (1, 3, 64, 64))  # torchinfo's summary
    assert f"Trainable params: {expected:,}\n" in table
    if backbone == "resnet18":  # output shapes of one 64x64 image
        assert "[1, 512, 1, 1]" in next(line for line in table.splitlines() if "(avgpool)" in line)
        assert "[1, 2]" in next(line for line in table.splitlines() if "(fc)" in line)


@pytest.fixture
def drawn_figures(monkeypatch):
    """The figures tl.engine.plots saves, kept open (and drawn) so a test can measure them."""
    from tl.engine import plots

    figures, close = [], plots.plt.close
    monkeypatch.setattr(plots.plt, "close", figures.append)
    yield figures
    for fig in figures:
        close(fig)


def test_confusion_numbers_are_dark_on_pale_cells(drawn_figures, tmp_path):
    from tl.engine.plots import confusion_matrix_plot

    # counts 48..51: the colour scale runs from 48 (palest) to 51 (darkest)
    confusion_matrix_plot(torch.tensor([[50, 48], [49, 51]]), ["a", "b"], tmp_path / "c.png")
    colours = {t.get_text(): t.get_color() for t in drawn_figures[0].axes[0].texts}
    assert colours == {"48": "black", "49": "black", "50": "white", "51": "white"}


def test_curves_have_whole_epoch_ticks_and_a_legend_off_the_lines(drawn_figures, tmp_path):
    from tl.engine.plots import compare_curves, run_curves

    rows = [{"epoch": 0, "phase": "val", "loss": 0.7, "acc": 0.5}]
    rows += [{"epoch": e, "phase": p, "loss": 0.7 - 0.1 * e, "acc": 0.5 + 0.1 * e}
             for e in (1, 2) for p in ("train", "val")]
    run_curves(rows, tmp_path / "run.png")
    compare_curves({f"recipe {i}": pd.DataFrame(rows) for i in range(7)}, tmp_path / "all.png")
    for fig in drawn_figures:
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            lo, hi = ax.get_xlim()
            ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
            assert ticks and all(float(t).is_integer() for t in ticks)
            assert ax.get_legend() is None  # the legend sits outside the axes ...
            for legend in fig.legends:  # ... and covers none of them
                assert not legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))


def test_grid_titles_stay_clear_of_the_row_above(drawn_figures, tmp_path):
    from tl.engine.plots import image_grid

    for titles in (["dog (cat)"] * 16, [f"a long class name {i} (another long class name)" for i in range(16)]):
        image_grid(torch.zeros(16, 3, 64, 64), titles, tmp_path / "g.png", mean=(0, 0, 0), std=(1, 1, 1),
                   title="predicted (true)")
        fig = drawn_figures[-1]
        renderer = fig.canvas.get_renderer()
        for above, below in zip(fig.axes[:8], fig.axes[8:]):
            # the second row's title ends below the first row's picture
            assert below.title.get_window_extent(renderer).y1 <= above.images[0].get_window_extent(renderer).y0
