"""Pictures: learning curves, the recipe comparison, image grids, and the pictures of a
finished run (`write_run_plots`).

matplotlib's Agg backend draws to files without a screen, so every function here works
on a server or in CI; each takes plain data (history rows, tensors) and a path, and
writes one PNG.
"""

from __future__ import annotations

import functools
import io
import re
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # headless: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.text  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib import font_manager, ft2font  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from tl.engine.class_names import CONTROL, shown_char  # noqa: E402

if TYPE_CHECKING:
    from tl.engine.headline import Headline
    from tl.loop import History
    from tl.models import Backbone


def save_figure(fig, path: str | Path) -> Path:
    """Write `fig`, drawn in memory first and then written atomically (tl/engine/files.py), so a
    full disk leaves no empty or cut-off picture. Figures here are made with layout="constrained",
    which places titles, labels and legends outside the axes without overlaps (tight_layout
    ignores fig.legend). Every text a figure holds shows a control character of a name (a colour
    escape, a carriage return) as its escape, as the terminal lines do (tl/engine/class_names.py):
    the font has no glyph for one, and matplotlib's warning would print it raw."""
    from tl.engine.files import atomic_write_bytes

    path = Path(path)
    picture = io.BytesIO()
    try:
        for text in fig.findobj(matplotlib.text.Text):
            text.set_text(_escaped(text.get_text()))
        for axis in (axis for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)):  # tick labels given as a list
            if isinstance(formatter := axis.get_major_formatter(), FuncFormatter):  # are drawn anew by a function
                formatter.func = _escaping(formatter.func)
        fig.savefig(picture, format=path.suffix[1:].lower() or "png", dpi=110)
    finally:
        plt.close(fig)
    return atomic_write_bytes(path, picture.getvalue())


def _escaped(text: str) -> str:
    """`text` with each control character but the line feed (a title's own line break) as its escape."""
    return re.sub(r"(?!\n)" + CONTROL.pattern, shown_char, text)


def _escaping(label):
    """A tick labeller (value, position -> text) whose labels are `_escaped`."""
    return lambda x, pos: _escaped(label(x, pos))


MAX_CLASSES_SHOWN = 30  # a confusion matrix with more classes shows the most-confused ones (all in confusion.csv)
MAX_INCHES = 14  # no figure grows past this on either side, whatever the class count (at 110 dpi: 1540 pixels)


@functools.lru_cache(maxsize=1)
def _glyphs() -> frozenset[int]:
    """The characters the figures' font can draw (CI has only DejaVu Sans: no Hangul, no CJK)."""
    font = font_manager.findfont(font_manager.FontProperties(family=plt.rcParams["font.family"]))
    return frozenset(ft2font.FT2Font(font).get_charmap())


def class_label(name: str, index: int, limit: int = 24) -> str:
    """A class name as a figure shows it: shortened with an ellipsis past `limit` characters,
    and its number "#index" where the font lacks a glyph for it (the full names go to a CSV)."""
    if not all(ord(c) in _glyphs() for c in name):
        return f"#{index}"
    return name if len(name) <= limit else name[: limit - 1] + "\u2026"


def series_styles(n: int) -> list[dict]:
    """Distinct colour and line style for each of `n` series: 10 colours, then dashes, then dots,
    so 12 recipes on one chart never share a look."""
    colours = plt.get_cmap("tab10").colors
    dashes = ("-", "--", ":", "-.")
    return [{"color": colours[i % 10], "linestyle": dashes[(i // 10) % len(dashes)]} for i in range(n)]


def run_curves(rows: list[dict] | pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Train and val loss and accuracy per epoch of one run (or several seeds: mean and range).

    Epoch 0 has only a val point: the untrained baseline, drawn as a hollow marker."""
    df = pd.DataFrame(rows)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), layout="constrained")
    for ax, metric in zip(axes, ("loss", "acc")):
        for phase, color in (("train", "tab:blue"), ("val", "tab:orange")):
            part = df[df.phase == phase].groupby("epoch")[metric].agg(["mean", "min", "max"])
            if part.empty:
                continue
            ax.plot(part.index, part["mean"], marker="o", color=color, label=phase)
            ax.fill_between(part.index, part["min"], part["max"], color=color, alpha=0.2)
        base = df[(df.epoch == 0) & (df.phase == "val")][metric]
        if len(base):
            ax.scatter([0], [base.mean()], s=120, facecolors="none", edgecolors="black", zorder=5,
                       label="epoch 0: baseline")
        ax.set_xlabel("epoch (0 = before training)")
        ax.set_ylabel("cross-entropy loss" if metric == "loss" else "accuracy")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels))  # below the axes, over no line
    fig.suptitle(title or "learning curves")
    return save_figure(fig, path)


def compare_curves(histories: dict[str, pd.DataFrame], path: str | Path, title: str = "") -> Path:
    """Val accuracy and val loss per epoch, one line per recipe (mean over seeds, min-max band)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5 + 0.25 * ((len(histories) + 2) // 3)), layout="constrained")
    for (label, df), style in zip(histories.items(), series_styles(len(histories))):
        val = df[df.phase == "val"]
        for ax, metric in zip(axes, ("acc", "loss")):
            g = val.groupby("epoch")[metric].agg(["mean", "min", "max"])
            ax.plot(g.index, g["mean"], marker="o", markersize=3, label=label, **style)
            ax.fill_between(g.index, g["min"], g["max"], color=style["color"], alpha=0.12)
    for ax, name in zip(axes, ("val accuracy", "val loss")):
        ax.axvline(0, color="gray", linestyle=":", linewidth=1)
        ax.text(0.1, 0.02, "epoch 0 = baseline", transform=ax.get_xaxis_transform(), fontsize=8, color="gray")
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=3, fontsize=8)
    fig.suptitle(f"{title + ': ' if title else ''}validation curves per recipe (mean over seeds, band = min..max)")
    return save_figure(fig, path)


def comparison_chart(summary: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Headline accuracy (mean ± std over seeds) next to training time, one row per recipe.

    The dot is the headline (not selected on the images it is scored on); the best val
    accuracy, selected on val, is a hollow diamond beside it, so the gap shows the optimism.
    The axis spans the best recipes' range, where the choice is made (a 0-1 axis hides the
    difference between 92% and 95%); a recipe far below it is written at the left edge."""
    done = summary[summary.status == "ok"].reset_index(drop=True)
    labels = [f"{e}\n{b}" for e, b in zip(done.experiment, done.backbone)]
    fig, (ax_acc, ax_time) = plt.subplots(1, 2, figsize=(12, 0.6 * len(done) + 2.5), sharey=True,
                                          layout="constrained")
    y = list(range(len(done)))
    headline = done.headline.iloc[0] if len(done) else "headline"
    mean, std = done.headline_acc_mean, done.headline_acc_std.fillna(0)
    left = max(0.0, ((mean.max() if len(done) else 0.0) - 0.12) // 0.05 * 0.05)
    shown = mean - std >= left
    ax_acc.errorbar(mean[shown], [i for i, ok in zip(y, shown) if ok], xerr=std[shown], fmt="o", color="tab:green",
                    capsize=3, label=f"headline: {headline}")
    best = done.best_val_acc_mean[shown]
    ax_acc.scatter(best, [i for i, ok in zip(y, shown) if ok], marker="D", s=30,
                   facecolors="none", edgecolors="tab:red", zorder=5, label="best val epoch (selected on val)")
    for i, ok in enumerate(shown):
        if not ok:
            ax_acc.text(left, i, f" \u25c0 {mean[i]:.3f} ± {std[i]:.3f}", va="center", ha="left", fontsize=8,
                        color="tab:green")
    ax_acc.set_xlim(left, 1.0)
    ax_acc.set_xlabel(f"accuracy (mean ± std over seeds; the axis starts at {left:.2f})")
    fig.legend(*ax_acc.get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize=8)
    ax_time.barh(y, done.train_seconds_mean, color="tab:purple", alpha=0.8)
    ax_time.set_xlabel("training time, seconds (mean over seeds)")
    ax_acc.set_yticks(y, labels, fontsize=8)
    ax_acc.invert_yaxis()
    for ax in (ax_acc, ax_time):
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{title + ': ' if title else ''}accuracy vs cost")
    return save_figure(fig, path)


def denormalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Undo `Normalize(mean, std)`: x * std + mean, per channel, clipped to [0, 1].

    (001's `im_convert` multiplies by (mean + std) instead, which only looks right
    because its mean and std are both 0.5 and it never normalised in the first place.)"""
    mean = torch.as_tensor(mean, dtype=images.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype).view(-1, 1, 1)
    return (images * std + mean).clamp(0, 1)


def image_grid(images: torch.Tensor, titles: list[str], path: str | Path, *, mean, std,
               colors: list[str] | None = None, cols: int = 8, title: str = "") -> Path:
    """A grid of normalised (N, 3, H, W) images with a title (and title colour) each."""
    n = len(images)
    rows = (n + cols - 1) // cols
    # constrained layout keeps each row's titles clear of the images above; long titles wrap
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2.5 * rows + 0.4), squeeze=False, layout="constrained")
    pictures = denormalize(images.detach().cpu().float(), mean, std)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(pictures[i].permute(1, 2, 0).numpy())  # (C, H, W) -> (H, W, C) for imshow
            ax.set_title(textwrap.fill(textwrap.shorten(titles[i], 40, placeholder="\u2026"), 20), fontsize=9,
                         color=(colors[i] if colors else "black"))
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def confusion_matrix_plot(matrix: torch.Tensor, classes: list[str], path: str | Path, title: str = "") -> Path:
    """Rows: true class; columns: predicted class; each cell its count.

    Bounded for any class count: past MAX_CLASSES_SHOWN classes it shows the classes with the
    most errors (the whole matrix, with full names, is in the CSV the caller writes beside it);
    names are shortened or numbered (`class_label`)."""
    shown = list(range(len(classes)))
    if len(classes) > MAX_CLASSES_SHOWN:  # the most-confused classes: errors made on them or into them
        errors = (matrix.sum(0) + matrix.sum(1) - 2 * matrix.diagonal()).tolist()
        shown = sorted(sorted(shown, key=lambda k: -errors[k])[:MAX_CLASSES_SHOWN])
        title = f"{title or 'confusion matrix'}\n(the {len(shown)} most-confused of {len(classes)} classes)"
    sub = matrix[shown][:, shown]
    side = min(MAX_INCHES, 0.45 * len(shown) + 3)
    fig, ax = plt.subplots(figsize=(side, side), layout="constrained")
    image = ax.imshow(sub.numpy(), cmap="Blues")
    # the colour scale runs from the smallest count (palest) to the largest (darkest), so
    # white text goes on cells past the middle of *that* range, not past half the maximum
    middle = (image.norm.vmin + image.norm.vmax) / 2
    size = 9 if len(shown) <= 12 else 6
    for i in range(len(shown)):
        for j in range(len(shown)):
            v = int(sub[i, j])
            ax.text(j, i, str(v), ha="center", va="center", fontsize=size, color="white" if v > middle else "black")
    labels = [class_label(classes[k], k) for k in shown]
    ax.set_xticks(range(len(shown)), labels, rotation=90 if len(shown) > 6 else 0, fontsize=size + 1)
    ax.set_yticks(range(len(shown)), labels, fontsize=size + 1)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix", fontsize=10)
    return save_figure(fig, path)


def class_names_csv(classes: list[str], path: str | Path) -> Path:
    """The full name of every class beside the label the pictures give it."""
    from tl.engine.tables import write_table

    return write_table(path, [[k, class_label(c, k), c] for k, c in enumerate(classes)],
                       ["index", "label_in_pictures", "class"])


def data_preview(data_dir: str | Path, backbone: str, out_dir: str | Path, seed: int = 0, *,
                 val_split: float | None = None, split_seed: int = 0, log=print) -> list[Path]:
    """`main.py --show-data`: what the network is shown.

    augmentation.png: one training photo through the val transform, then 8 draws of the
        train transform (RandomResizedCrop + flip; document 001's augmentation demo);
    batch.png: 16 training images as a DataLoader serves them, with their class names
        (001, 5-14), de-normalised with the backbone's own mean/std.
    The images are the training run's own: the same scan, the same --val-split.
    """
    from tl.data import build_transforms, make_loaders
    from tl.engine.backbones import backbone_spec
    from tl.engine.images import load_rgb
    from tl.engine.selection import ImageChoice, select_images

    spec = backbone_spec(backbone)
    torch.manual_seed(seed)
    transforms = build_transforms(spec.mean, spec.std, size=spec.image_size)
    sets = select_images(ImageChoice(Path(data_dir), val_split=val_split, split_seed=split_seed), transforms,
                         phases=("train", "val"), log=log)
    train = sets["train"]
    photo = load_rgb(train.samples[0][0])
    views = [transforms["val"](photo)] + [transforms["train"](photo) for _ in range(8)]
    out_dir = Path(out_dir)
    written = [image_grid(torch.stack(views), ["val transform"] + [f"train draw {i}" for i in range(1, 9)],
                          out_dir / "augmentation.png", mean=spec.mean, std=spec.std, cols=9,
                          title=f"RandomResizedCrop({spec.image_size}, scale=(0.5, 1)) + flip: "
                                f"{Path(train.samples[0][0]).name}")]
    images, labels = next(iter(make_loaders({"train": train}, 16, seed=seed)["train"]))
    written.append(image_grid(images, [train.classes[i] for i in labels], out_dir / "batch.png", mean=spec.mean,
                              std=spec.std, title="a training batch (augmented), with class names"))
    return written


def top_losses_plot(dataset, probabilities: torch.Tensor, classes: list[str], path: str | Path, *, mean, std,
                    k: int = 16, title: str = "", split: str = "val") -> Path:
    """The val images the model got most confidently wrong (fastai's `plot_top_losses`), each
    titled "predicted / true / probability of the prediction"; `probabilities` (N, C) are
    the model's on `dataset`, in its order. With no mistake, the figure says so."""
    from tl.engine.explain import top_losses

    rows = top_losses(probabilities, list(dataset.targets), k)
    if not rows:
        fig, ax = plt.subplots(figsize=(6, 2), layout="constrained")
        ax.axis("off")
        ax.text(0.5, 0.5, f"no {split} image is misclassified ({len(dataset)} images)", ha="center", va="center")
        fig.suptitle(title or "top losses")
        return save_figure(fig, path)
    images = torch.stack([dataset[r["index"]][0] for r in rows])
    names = [Path(dataset.samples[r["index"]][0]).name if hasattr(dataset, "samples") else "" for r in rows]
    titles = [f"{class_label(classes[r['predicted']], r['predicted'])} / {class_label(classes[r['true']], r['true'])}"
              f" / {r['probability']:.2f} {name}" for r, name in zip(rows, names)]
    return image_grid(images, titles, path, mean=mean, std=std, colors=["red"] * len(rows), cols=min(8, len(rows)),
                      title=title or f"most confidently wrong: predicted / true / probability / file "
                                     f"({len(rows)} of the misclassified {split} images, largest loss first)")


def _overlay(ax, picture: torch.Tensor, cam: torch.Tensor | None) -> None:
    ax.axis("off")
    ax.imshow(picture.permute(1, 2, 0).numpy())  # (C, H, W) -> (H, W, C)
    if cam is not None:  # the map over the photo: jet colours, half transparent
        ax.imshow(cam.numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)


def cam_figure(images: torch.Tensor, rows: list[tuple[str, torch.Tensor, list[str]]], path: str | Path, *,
               mean, std, photo_titles: list[str] | None = None, title: str = "") -> Path:
    """Photos in the first row, then one row of class-activation maps per model.

    rows: (row label, maps (N, H, W) in [0, 1], a title per image such as "bee 0.97")."""
    n = len(images)
    pictures = denormalize(images.detach().cpu().float(), mean, std)
    fig, axes = plt.subplots(1 + len(rows), n, figsize=(2.2 * n + 1, 2.5 * (1 + len(rows)) + 0.4), squeeze=False,
                             layout="constrained")
    for j in range(n):
        _overlay(axes[0, j], pictures[j], None)
        if photo_titles:
            axes[0, j].set_title(textwrap.shorten(photo_titles[j], 28, placeholder="\u2026")
                                 if " " in photo_titles[j] else _middle_cut(photo_titles[j], 28), fontsize=8)
        for i, (_label, maps, titles) in enumerate(rows, start=1):
            _overlay(axes[i, j], pictures[j], maps[j])
            axes[i, j].set_title(textwrap.fill(titles[j], 22), fontsize=8)
    for i, (label, _, _) in enumerate([("photo", None, None), *rows]):
        axes[i, 0].text(-0.08, 0.5, label, transform=axes[i, 0].transAxes, rotation=90, ha="right", va="center",
                        fontsize=9)
    fig.suptitle(textwrap.fill(title or "Grad-CAM: where the evidence for the predicted class lies (red = most)",
                               max(40, int(18 * n))), fontsize=10)
    return save_figure(fig, path)


def _middle_cut(name: str, limit: int) -> str:
    """A file name cut in its middle, so its start and its extension both stay readable."""
    return name if len(name) <= limit else name[: limit // 2 - 1] + "\u2026" + name[-(limit // 2):]


def projection_plot(panels: list[tuple[str, torch.Tensor, torch.Tensor]], labels: list[int], classes: list[str],
                    path: str | Path, title: str = "") -> Path:
    """Side-by-side 2-D projections of the same images, coloured by true class.

    panels: (panel title, coords (N, 2), explained variance of the 2 axes)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.8), squeeze=False, layout="constrained")
    labels_t = torch.as_tensor(labels)
    for ax, (name, coords, explained) in zip(axes[0], panels):
        for k, cls in enumerate(classes):
            pts = coords[labels_t == k]
            ax.scatter(pts[:, 0], pts[:, 1], s=14, alpha=0.75, label=class_label(cls, k))
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(f"PC 1 ({100 * float(explained[0]):.1f}% of variance)")
        ax.set_ylabel(f"PC 2 ({100 * float(explained[1]):.1f}% of variance)")
        ax.grid(alpha=0.3)
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=min(len(classes), 6))
    fig.suptitle(title or "val images in feature space (PCA of the head's input), coloured by true class")
    return save_figure(fig, path)


def write_run_plots(run_dir: Path, history: History, headline: Headline, classes: list[str],
                    spec: Backbone) -> None:
    """The pictures of a finished run: learning curves, and the headline model's confusion
    matrix, prediction grid (document 001, 5-26 to 5-29) and top losses on the headline split,
    each titled with what it shows, so a picture never disagrees with the printed result."""
    run_curves(history.rows, run_dir / "curves.png", title=run_dir.name)
    what, acc, result = headline.record["headline"], headline.record["headline_acc"], headline.evaluation
    split = what.split(",")[0]
    class_names_csv(classes, run_dir / "classes.csv")  # full names beside the pictures' labels
    confusion_matrix_plot(result["confusion"], classes, run_dir / "confusion.png",
                          title=f"{what}: accuracy {acc:.4f}")
    top_losses_plot(headline.images, result["probabilities"], classes, run_dir / "top_losses.png",
                    mean=spec.mean, std=spec.std, split=split)  # fastai's plot_top_losses
    images = headline.images
    step = max(1, len(images) // 16)  # 16 images spread over the classes (a split is sorted by class)
    picked = list(range(0, len(images), step))[:16]
    preds = [int(result["predictions"][i]) for i in picked]
    labels = [images.targets[i] for i in picked]
    titles = [f"{class_label(classes[p], p)} ({class_label(classes[t], t)})" for p, t in zip(preds, labels)]
    colours = ["green" if p == t else "red" for p, t in zip(preds, labels)]
    image_grid(torch.stack([images[i][0] for i in picked]), titles, run_dir / "predictions.png",
               mean=spec.mean, std=spec.std, colors=colours, title=f"predicted (true) on {what}")
