"""Classifying photos without labels: single images (`predict_images`, `main.py --predict
IMG...`) and a folder of photos in, a table out (`main.py --predict DIR --checkpoint RUN/best.pth`).

Every file under DIR (sub-folders included, hidden and system folders left out, as in a
data set) is decided by the rule training uses (tl/engine/images.py): its name must say
image (`not_an_image`), the scan's checks must pass (`check_image`) and it must
decode (`load_rgb`, upright by its EXIF tag). The images are classified in batches, with
the val transform of the model's backbone; what is not an image, or cannot be read, is
listed by name and written nowhere else, and never stops the rest.

The table (CSV, written once at the end, atomically; an existing file is never replaced)
has one row per image: its path relative to DIR, the predicted class, and the probability
of every class (`p_<class>`, a softmax, so each row sums to 1; a single-logit head gives
both of its classes, 1 - p and p).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tl import TLError
from tl.data import build_transforms
from tl.engine.class_names import one_line
from tl.engine.evaluate import class_probabilities
from tl.engine.files import atomic_write_text
from tl.engine.images import check_image, load_rgb, not_an_image, walk_files
from tl.engine.progress import progress as show
from tl.engine.tables import table_text as csv_text


def _why(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"cannot be read ({type(exc).__name__}: {lines[0][:120]})" if lines else f"cannot be read ({exc!r})"


def scan_folder(folder: Path, progress: bool = True) -> tuple[list[str], list[tuple[str, str]]]:
    """(the image files under `folder`, sorted; [(file or folder, why it is left out)]), counting the
    files seen on stderr (`progress`)."""
    ignored: list[tuple[str, str]] = []
    files, left_out = [], []
    for path in show(walk_files(str(folder), ignored), f"scanning {folder}", unit=" files", enabled=progress):
        if (why := not_an_image(path)) is None:  # the rule training uses, with its reason
            files.append(path)
        else:
            left_out.append((path, why))
    return files, left_out + [(path, f"{why} folder, not read") for path, why in ignored]


class Photos(Dataset):
    """The files, each as (image tensor, index, "") or, when it cannot be used, (None, index, why)."""

    def __init__(self, files: list[str], transform):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            if (why := check_image(self.files[i])) is not None:  # the scan's decision, as in training
                return None, i, why
            return self.transform(load_rgb(self.files[i])), i, ""
        except Exception as exc:  # noqa: BLE001 - a file that changed or breaks late: listed, never fatal
            return None, i, _why(exc)


def _batch(items: list) -> tuple:
    """(stacked images or None, their indices, [(index, why)] of the files that failed)."""
    ok = [(x, i) for x, i, why in items if not why]
    failed = [(i, why) for _, i, why in items if why]
    return (torch.stack([x for x, _ in ok]) if ok else None), [i for _, i in ok], failed


@torch.no_grad()
def classify(model: nn.Module, files: list[str], transform, *, batch_size: int = 32, device="cpu", workers: int = 0,
             progress: bool = True) -> tuple[dict[int, torch.Tensor], list[tuple[int, str]]]:
    """({file index: class probabilities}, [(file index, why it failed)]) for `files`, in batches."""
    model.eval().to(device)
    loader = DataLoader(Photos(files, transform), batch_size=batch_size, num_workers=workers, collate_fn=_batch)
    probabilities, failed = {}, []
    for images, indices, bad in show(loader, f"classifying {len(files)} images", unit=" batches", enabled=progress):
        failed += bad
        if images is not None:
            probs = class_probabilities(model(images.to(device)).float().cpu())
            probabilities.update(zip(indices, probs))
    return probabilities, failed


def new_table_path(out: Path) -> Path:
    """OUT/predictions-<time>.csv, with -2, -3, ... where that name is taken."""
    stem = f"predictions-{time.strftime('%Y%m%d-%H%M%S')}"
    for i in range(1, 1000):
        path = Path(out) / (f"{stem}.csv" if i == 1 else f"{stem}-{i}.csv")
        if not path.exists():
            return path
    raise TLError(f"{out} already holds 999 tables named {stem}-N.csv; choose --csv")


def check_table_path(path: Path) -> None:
    if path.exists() or path.is_symlink():
        raise TLError(f"--csv {path} exists already, and a table is never written over: choose another name, "
                      f"or move that file away")


def table_text(folder: Path, files: list[str], probabilities: dict[int, torch.Tensor], classes: list[str]) -> str:
    """The CSV text of the table (tl/engine/tables.py: a spreadsheet runs none of its names)."""
    rows = [[Path(os.path.relpath(files[i], folder)).as_posix(), classes[int(p.argmax())], *(float(v) for v in p)]
            for i, p in sorted(probabilities.items())]
    return csv_text(rows, ["path", "prediction", *(f"p_{c}" for c in classes)])


def predict_folder(model: nn.Module, folder: Path, table: Path, classes: list[str], transform, *,
                   batch_size: int = 32, device="cpu", workers: int = 0, progress: bool = True,
                   log: Callable[[str], None] = print) -> dict:
    """Classify every image under `folder` into the CSV `table` (see the module docstring) and
    log a summary: images per predicted class, and every file left out with the reason.
    A folder without one readable image is an error, and nothing is written."""
    files, left_out = scan_folder(folder, progress)
    if not files:
        raise TLError(f"{folder} holds no image files (looked in every sub-folder; "
                      f"{len(left_out)} other file(s) or folder(s)): nothing to classify, nothing written")
    probabilities, failed = classify(model, files, transform, batch_size=batch_size, device=device, workers=workers,
                                     progress=progress)
    left_out += [(files[i], why) for i, why in failed]
    listing = [f"  {Path(os.path.relpath(path, folder)).as_posix()}: {why}" for path, why in sorted(left_out)]
    if not probabilities:
        raise TLError(f"none of the {len(files)} image file(s) under {folder} could be read; nothing written:\n"
                      + "\n".join(listing))
    check_table_path(table)  # again: another program may have made it meanwhile
    atomic_write_text(table, table_text(folder, files, probabilities, classes))
    counts = Counter(classes[int(p.argmax())] for p in probabilities.values())
    # each on its line: a name holding a line feed or a terminal's escape is shown as its escape (\n, \x1b)
    log(one_line(f"classified {len(probabilities)} image(s) under {folder} -> {table}"))
    log(one_line("predicted classes: " + ", ".join(f"{name} {n}" for name, n in counts.most_common())))
    if left_out:
        log(f"skipped {len(left_out)} file(s) or folder(s), in no table:")
        for line in listing:
            log(one_line(line))
    return {"table": table, "images": len(probabilities), "counts": dict(counts), "skipped": sorted(left_out)}


@torch.no_grad()
def predict_images(model: nn.Module, images: list[Path], classes: list[str], mean, std, size: int = 224,
                   top: int = 3) -> list[tuple[Path, list[tuple[str, float]] | str]]:
    """For each image: its top classes with probabilities, or why it could not be read.
    Document 002 §1.1's ILSVRCPredictor, with the class names stored in the run (or ImageNet's
    1000 names, read from torchvision's weights metadata instead of a downloaded JSON)."""
    transform = build_transforms(mean, std, size=size, augment=False)["val"]
    model.eval()
    results = []
    for path in images:
        try:
            x = transform(load_rgb(path)).unsqueeze(0)  # (1, 3, H, W): a batch of one
        except Exception as exc:
            results.append((path, f"cannot read {path}: {type(exc).__name__}: {exc}".splitlines()[0]))
            continue
        probs = class_probabilities(model(x))[0]  # one logit: P(class 1) = sigmoid
        values, indices = probs.topk(min(top, len(probs)))
        results.append((path, [(classes[i], v) for v, i in zip(values.tolist(), indices.tolist())]))
    return results
