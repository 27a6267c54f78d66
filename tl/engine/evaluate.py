"""Scoring saved models on a split of images (inference only: nothing trains here).

* `evaluate`: loss, accuracy, per-class accuracy and the confusion matrix of a model
  on one split. The confusion matrix says *which* mistakes are made: 90% accuracy can
  mean "every bee called an ant" on an unbalanced set.
* `evaluate_folder`: document 001's `eval_model` (5-24) done right: every per-epoch
  file of a run, ordered by epoch, one row each. 001's version returns inside the loop
  after the first file and thresholds class *indices* at 0.5 (docs/ERRATA.md).

The saved model is rebuilt by tl/engine/model_loading.py; classifying photos without labels
is tl/engine/predict.py.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from tl import TLError
from tl.data import build_transforms
from tl.engine.backbones import backbone_spec
from tl.engine.class_names import how_names_differ, one_line
from tl.engine.images import PHASES
from tl.engine.metrics import classification_report, write_report
from tl.engine.model_loading import ModelContext, load_model
from tl.engine.progress import progress
from tl.engine.selection import ImageChoice, TooFewImages, select_images
from tl.engine.tables import write_table
from tl.engine.tta import mirrored_if
from tl.loop import loss_targets, predictions

# per-epoch weight files: 001's "03.pth" and 004's "epoch03-loss0.1820-acc0.9412.pth"
EPOCH_FILE = re.compile(r"^(?:epoch)?(\d+)(?:-loss([\d.]+)-acc([\d.]+))?\.pth$")


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, num_classes: int) -> dict:
    """Loss, accuracy, per-class accuracy, confusion matrix (rows = true class), and the
    predicted class of every image in loader order ("predictions"): per-image results are
    what a paired comparison of two models needs (experiments/report.py)."""
    model.eval().to(device)
    single = None
    total_loss, confusion = 0.0, torch.zeros(num_classes, num_classes, dtype=torch.long)
    predicted: list[int] = []
    probabilities: list[torch.Tensor] = []
    for inputs, labels in progress(loader, f"scoring {len(loader.dataset)} images", unit=" batches"):
        outputs = model(inputs.to(device)).float().cpu()
        single = outputs.shape[1] == 1
        criterion = nn.functional.binary_cross_entropy_with_logits if single else nn.functional.cross_entropy
        total_loss += criterion(outputs, loss_targets(outputs, labels), reduction="sum").item()
        probabilities.append(class_probabilities(outputs))
        batch = predictions(outputs).tolist()
        predicted += batch
        for t, p in zip(labels.tolist(), batch):
            confusion[t, p] += 1
    n = int(confusion.sum())
    per_class = (confusion.diag().float() / confusion.sum(1).clamp(min=1)).tolist()
    return {"loss": total_loss / n, "acc": confusion.diag().sum().item() / n, "per_class_acc": per_class,
            "confusion": confusion, "n": n, "predictions": predicted,
            "probabilities": torch.cat(probabilities) if probabilities else torch.zeros(0, num_classes)}


def class_probabilities(outputs: torch.Tensor) -> torch.Tensor:
    """(B, C) class probabilities from logits: softmax over C logits; a single logit z
    (004 §3's BCE head) is P(class 1) = sigmoid(z), so the two columns are (1 - p, p)."""
    if outputs.shape[1] == 1:
        p1 = torch.sigmoid(outputs[:, 0])
        return torch.stack([1 - p1, p1], dim=1)
    return outputs.softmax(1)


def format_evaluation(result: dict, classes: list[str]) -> str:
    classes = [one_line(c) for c in classes]  # a name's line feed or escape shown as \\n, \\x1b: one line each
    width = max(len(c) for c in classes) + 2
    lines = [f"loss {result['loss']:.4f}  accuracy {result['acc']:.4f}  ({result['n']} images)", "per class:"]
    lines += [f"  {c:<{width}} {a:.4f}" for c, a in zip(classes, result["per_class_acc"])]
    lines.append("confusion matrix (rows: true, columns: predicted):")
    lines.append(" " * (width + 2) + "".join(f"{c[:8]:>9}" for c in classes))
    for c, row in zip(classes, result["confusion"].tolist()):
        lines.append(f"  {c:<{width}}" + "".join(f"{v:>9}" for v in row))
    return "\n".join(lines)


def epoch_files(folder: Path) -> list[tuple[int, Path]]:
    """Per-epoch weight files in `folder`, ordered by epoch number (not by name)."""
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := EPOCH_FILE.match(p.name))]
    return sorted(found)


def split_loader(data: Path, split: str, ctx: ModelContext, batch_size: int = 32, log=print):
    """The images of one split, chosen and reported as training chose them (the same scan, for a
    --val-split run the same seeded split of the same folder, and for train the same subset)."""
    spec = backbone_spec(ctx.backbone)
    transforms = build_transforms(spec.mean, spec.std, size=ctx.image_size, augment=False)
    # train: exactly the images the run trained on (its --quick/--max-per-class subset, then its
    # --train-per-class draw); val and test: the whole split, the more images the better the score.
    # A folder that is split already is scored as it is, even if the run split its own (--val-split).
    choice = dataclasses.replace(ImageChoice.of(ctx), data=data,
                                 val_split=None if (data / split).is_dir() else ctx.val_split)
    if split != "train":
        choice = dataclasses.replace(choice, max_per_class=None, train_per_class=None, train_fraction=None)
    try:
        ds = select_images(choice, transforms, phases=(split,), log=log)[split]
    except TooFewImages:
        raise TLError(f"the run trained on a seeded draw of {ctx.train_per_class} images per class "
                      f"(--train-per-class); {data / split} has fewer in some class, so its train split "
                      f"cannot be scored as the run saw it. Score --split val, or its own data folder") from None
    if ctx.classes is not None and ds.classes != ctx.classes:
        raise TLError(f"the model was trained on classes {ctx.classes}, but {data / split} has {ds.classes}"
                      + how_names_differ(ctx.classes, ds.classes, "the model's config", str(data / split)))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size), ds.classes


def evaluate_folder(folder: Path, ctx: ModelContext, loader, classes: list[str], device: torch.device, split: str,
                    allow_pickle: bool = False, log=print) -> pd.DataFrame:
    """Every per-epoch weight file of a run folder (00.pth, 01.pth, ... from --save-every-epoch),
    ordered by epoch, scored on `loader` (the images of `split`): one row each, written to
    FOLDER/eval_<split>.csv (eval_<split>-tta.csv with `ctx.tta`: each photo and its mirror).
    Document 001's `eval_model` (5-24) done right (docs/ERRATA.md)."""
    files = epoch_files(folder)
    if not files:
        raise TLError(f"{folder} holds no per-epoch weight files (00.pth, 01.pth, ... from --save-every-epoch)")
    rows, tta = [], "-tta" if ctx.tta else ""
    for epoch, file in files:
        model = mirrored_if(load_model(file, ctx, len(classes), allow_pickle), ctx.tta)
        result = evaluate(model, loader, device, len(classes))
        if file == files[-1][1]:  # the final epoch's, which nothing selected: its classification report
            write_evaluation_report(folder / f"evaluate-{file.stem}-{split}{tta}", result, loader.dataset, classes,
                                    log)
        rows.append({"epoch": epoch, "file": file.name, "loss": result["loss"], "acc": result["acc"],
                     **{f"acc_{c}": a for c, a in zip(classes, result["per_class_acc"])}})
        log(f"epoch {epoch:>3}  {file.name:<40} loss {result['loss']:.4f}  acc {result['acc']:.4f}")
    table = pd.DataFrame(rows)
    out = folder / f"eval_{split}{tta}.csv"
    write_table(out, table)
    # training's rule: the highest accuracy, ties to the lower loss, then to the earlier epoch
    best = table.sort_values(["acc", "loss", "epoch"], ascending=[False, True, True]).iloc[0]
    log(f"best {split} accuracy {best.acc:.4f} at epoch {int(best.epoch)} (ties: lower loss); wrote {out}")
    return table


def write_evaluation_report(folder: Path, result: dict, dataset, classes: list[str], log=print) -> dict:
    """The classification report (tl/engine/metrics.py) of an `evaluate` result on `dataset`'s
    images, written to `folder` (classification_report.csv/.md, confused_pairs.csv)."""
    root = Path(dataset.root)  # files named from the data folder, as in headline_predictions.csv
    root = root.parent if root.name in PHASES else root  # (a --val-split run's split is the data folder)
    report = classification_report([classes[t] for _, t in dataset.samples],
                                   [classes[p] for p in result["predictions"]],
                                   [Path(os.path.relpath(p, root)).as_posix() for p, _ in dataset.samples], classes)
    page = write_report(folder, report, f"{folder.name} ({dataset.root})")
    log(f"classification report: macro-F1 {report['macro_f1']:.4f}, balanced accuracy "
        f"{report['balanced_accuracy']:.4f} -> {page}")
    return report
