"""Pictures stay readable and bounded for 2 to 1,000 classes and any name, say which model
and split they show, and never lose a trained run. Sizes and element counts, never seconds."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from PIL import Image

from tests.conftest import write_image_folder
from tl.engine import plots
from tl.engine.options import RunOptions
from tl.engine.run import run
from tl.recipe import Recipe

pytestmark = pytest.mark.usefixtures("own_cache_dir")


def _capture(monkeypatch) -> list:
    """The figures the plots module saves, with their text elements counted before saving."""
    seen, real = [], plots.save_figure

    def save(fig, path):
        seen.append({"texts": sum(len(ax.texts) for ax in fig.axes), "size": tuple(fig.get_size_inches())})
        return real(fig, path)

    monkeypatch.setattr(plots, "save_figure", save)
    return seen


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


def test_class_labels_shorten_long_names_and_number_what_the_font_cannot_draw(tmp_path):
    assert plots.class_label("ants", 0) == "ants"
    long = plots.class_label("x" * 200, 3)
    assert len(long) == 24 and long.endswith("\u2026")
    assert plots.class_label("개", 7) == "#7"  # DejaVu Sans has no Hangul: the number, with a legend
    path = plots.class_names_csv(["개", "a, b", "cat"], tmp_path / "classes.csv")
    table = pd.read_csv(path)
    assert table["class"].tolist() == ["개", "a, b", "cat"]
    assert table.label_in_pictures.tolist() == ["#0", "a, b", "cat"]


def test_twelve_recipes_never_share_a_colour_and_style(tmp_path):
    styles = plots.series_styles(12)
    assert len({(s["color"], s["linestyle"]) for s in styles}) == 12


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


def test_a_picture_that_cannot_be_drawn_never_loses_the_run(tmp_path, tiny_backbone, monkeypatch):
    data = write_image_folder(tmp_path / "d")

    def broken(*args, **kwargs):
        raise MemoryError("no room for the picture")

    monkeypatch.setattr(plots, "confusion_matrix_plot", broken)
    result = _tiny_run(data, tmp_path)
    config = json.loads((result.run_dir / "config.json").read_text())
    assert "headline_acc" in config["results"] and (result.run_dir / "best.pth").is_file()


def test_evaluate_names_the_best_epoch_by_training_s_rule_on_a_tie(tmp_path, monkeypatch):
    from tl.engine import evaluate as ev

    for epoch in range(4):
        (tmp_path / f"{epoch:02d}.pth").write_bytes(b"")
    scores = {"00.pth": (0.7, 0.60), "01.pth": (0.9, 0.40), "02.pth": (0.8, 0.30), "03.pth": (0.9, 0.35)}
    monkeypatch.setattr(ev, "load_model", lambda file, *a, **k: file.name)
    monkeypatch.setattr(ev, "write_evaluation_report", lambda *a, **k: None)  # (its report: tested elsewhere)
    monkeypatch.setattr(ev, "evaluate", lambda name, *a, **k: {"acc": scores[name][0], "loss": scores[name][1],
                                                                  "per_class_acc": []})
    lines = []
    ev.evaluate_folder(tmp_path, SimpleNamespace(tta=False), SimpleNamespace(dataset=None), [], "cpu", "val",
                       log=lines.append)
    assert "best val accuracy 0.9000 at epoch 3" in lines[-1]  # equal accuracy: the lower loss, as training picks


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
