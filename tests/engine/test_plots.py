"""tl/engine/plots.py: pictures are written headless, stay readable and bounded for 2 to 1,000
classes and any name, say which model and split they show, and never lose a trained run;
de-normalisation really inverts normalisation. Sizes and element counts, never seconds."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tests.conftest import write_image_folder
from tl.data import build_transforms
from tl.engine import plots
from tl.engine.options import RunOptions
from tl.engine.plots import denormalize
from tl.engine.run import run
from tl.recipe import Recipe


def test_denormalize_round_trips():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    pixels = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    normalised = build_transforms(mean, std, size=40, resize=40, augment=False)["val"](Image.fromarray(pixels))
    restored = denormalize(normalised, mean, std)
    assert torch.allclose(restored, torch.from_numpy(pixels).permute(2, 0, 1).float() / 255, atol=1e-5)
    # 001's im_convert, x * (mean + std), is not the inverse
    wrong = (normalised * (torch.tensor(mean) + torch.tensor(std)).view(3, 1, 1)).clamp(0, 1)
    assert not torch.allclose(wrong, restored, atol=0.05)


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


def _capture(monkeypatch) -> list:
    """The figures the plots module saves, with their text elements counted before saving."""
    seen, real = [], plots.save_figure

    def save(fig, path):
        seen.append({"texts": sum(len(ax.texts) for ax in fig.axes), "size": tuple(fig.get_size_inches())})
        return real(fig, path)

    monkeypatch.setattr(plots, "save_figure", save)
    return seen


@pytest.mark.usefixtures("own_cache_dir")
@pytest.mark.parametrize("n", [2, 120, 1000])
def test_the_confusion_matrix_is_bounded_for_any_class_count(n, tmp_path, monkeypatch):
    seen = _capture(monkeypatch)
    torch.manual_seed(0)
    matrix = torch.randint(0, 5, (n, n))
    classes = [f"class number {k} with a rather long name indeed" for k in range(n)]
    path = plots.confusion_matrix_plot(matrix, classes, tmp_path / "c.png", title="val, final epoch")
    with Image.open(path) as img:
        assert max(img.size) <= plots.MAX_INCHES * 110 + 1
    shown = min(n, plots.MAX_CLASSES_SHOWN)
    assert seen[0]["texts"] == shown * shown  # one count per cell shown, never n * n


@pytest.mark.usefixtures("own_cache_dir")
def test_class_labels_shorten_long_names_and_number_what_the_font_cannot_draw(tmp_path):
    assert plots.class_label("ants", 0) == "ants"
    long = plots.class_label("x" * 200, 3)
    assert len(long) == 24 and long.endswith("\u2026")
    assert plots.class_label("개", 7) == "#7"  # DejaVu Sans has no Hangul: the number, with a legend
    path = plots.class_names_csv(["개", "a, b", "cat"], tmp_path / "classes.csv")
    table = pd.read_csv(path)
    assert table["class"].tolist() == ["개", "a, b", "cat"]
    assert table.label_in_pictures.tolist() == ["#0", "a, b", "cat"]


@pytest.mark.usefixtures("own_cache_dir")
def test_twelve_recipes_never_share_a_colour_and_style(tmp_path):
    styles = plots.series_styles(12)
    assert len({(s["color"], s["linestyle"]) for s in styles}) == 12


@pytest.mark.usefixtures("own_cache_dir")
def test_the_comparison_axis_spans_the_accuracies_where_the_choice_is_made(tmp_path, monkeypatch):
    axes = []
    real = plots.save_figure
    monkeypatch.setattr(plots, "save_figure",
                        lambda fig, path: (axes.append(fig.axes[0].get_xlim()), real(fig, path))[1])
    summary = pd.DataFrame({"status": ["ok"] * 2, "experiment": ["a", "b"], "backbone": ["x", "x"],
                            "headline": ["val, final epoch"] * 2, "headline_acc_mean": [0.93, 0.95],
                            "headline_acc_std": [0.01, 0.007], "best_val_acc_mean": [0.94, 0.96],
                            "baseline_val_acc_mean": [0.5, 0.45], "train_seconds_mean": [10.0, 20.0]})
    plots.comparison_chart(summary, tmp_path / "chart.png")
    assert 0.8 <= axes[0][0] <= 0.9 and axes[0][1] == 1.0


def _tiny_run(data, tmp_path, **options):
    recipe = Recipe(name="pictures", source="test", strategy="all", backbone="tiny", weights="none", train_epochs=1,
                    batch_size=8)

    def build(model, spec, recipe):
        return model, torch.optim.SGD(model.parameters(), lr=0.05)

    opts = RunOptions(data=data, workers=0, out=tmp_path / "runs", image_size=32, progress=False, **options)
    return run(recipe, build, opts, log=lambda s: None)


@pytest.mark.usefixtures("own_cache_dir")
@pytest.mark.parametrize("with_test", [False, True])
def test_the_run_pictures_show_the_headline_model_on_the_headline_split(with_test, tmp_path, tiny_backbone,
                                                                         monkeypatch):
    phases = ("train", "val", "test") if with_test else ("train", "val")
    data = write_image_folder(tmp_path / "d", phases=phases)
    titles = []
    real = plots.confusion_matrix_plot
    monkeypatch.setattr(plots, "confusion_matrix_plot",
                        lambda matrix, classes, path, title="": (titles.append((title, int(matrix.sum()))),
                                                                 real(matrix, classes, path, title))[1])
    result = _tiny_run(data, tmp_path)
    res = json.loads((result.run_dir / "config.json").read_text())["results"]
    (title, total), = titles
    assert title == f"{res['headline']}: accuracy {res['headline_acc']:.4f}"
    assert total == len(pd.read_csv(result.run_dir / "headline_predictions.csv"))  # the headline split's images
    assert (result.run_dir / "classes.csv").is_file()


@pytest.mark.usefixtures("own_cache_dir")
def test_a_picture_that_cannot_be_drawn_never_loses_the_run(tmp_path, tiny_backbone, monkeypatch):
    data = write_image_folder(tmp_path / "d")

    def broken(*args, **kwargs):
        raise MemoryError("no room for the picture")

    monkeypatch.setattr(plots, "confusion_matrix_plot", broken)
    result = _tiny_run(data, tmp_path)
    config = json.loads((result.run_dir / "config.json").read_text())
    assert "headline_acc" in config["results"] and (result.run_dir / "best.pth").is_file()


@pytest.mark.usefixtures("own_cache_dir")
def test_grad_cam_titles_keep_the_file_extension_and_the_title_fits(tmp_path, monkeypatch):
    titles = []
    real = plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: (
        titles.append(([ax.get_title() for ax in fig.axes[:2]], fig._suptitle.get_text())), real(fig, path))[1])
    images = torch.zeros(2, 3, 16, 16)
    maps = torch.rand(2, 16, 16)
    names = ["a_very_long_photo_name_from_a_phone_camera_20261126_153000.jpg", "bee.jpg"]
    plots.cam_figure(images, [("Grad-CAM", maps, ["bee 0.97", "ant 0.51"])], tmp_path / "cam.png", mean=(0.5,) * 3,
                     std=(0.5,) * 3, photo_titles=names, title="x " * 80)
    (first, second), suptitle = titles[0]
    assert first.endswith(".jpg") and "\u2026" in first and len(first) <= 28 and second == "bee.jpg"
    assert all(len(line) <= 40 for line in suptitle.splitlines())  # wrapped to the figure, not clipped




def test_a_figures_texts_show_a_names_control_characters_as_escapes(tmp_path, capfd):
    """A title, an axis title, tick labels and a legend holding a colour escape, a carriage return
    and a bidi mark (class names, a data set's name): the saved figure shows each as its escape, so
    no "Glyph missing" warning prints one raw; a line break of a title stays a line break."""
    import warnings

    import matplotlib.pyplot as plt

    hostile = "bee\x1b[31m\r\u202e"
    fig, ax = plt.subplots()
    ax.plot([0, 1], label=hostile)
    ax.legend()
    ax.set_xticks([0, 1], [hostile, "ant"])
    texts = [fig.suptitle(f"data\n{hostile}"), ax.set_title(hostile)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plots.save_figure(fig, tmp_path / "f.png")
    assert texts[0].get_text() == "data\nbee\\x1b[31m\\r\\u202e" and texts[1].get_text() == "bee\\x1b[31m\\r\\u202e"
    assert ax.get_legend().get_texts()[0].get_text() == ax.get_xticklabels()[0].get_text() == texts[1].get_text()
    shown = "".join(str(w.message) for w in caught) + "".join(capfd.readouterr())
    assert not [c for c in shown if c in "\x1b\r\u202e"], shown
