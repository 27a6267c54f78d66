"""Which images a run uses: THE one function that chooses them (`select_images`).

Training, `--evaluate`, `--show-data`, the studies and the benchmarks all call
`select_images`, so `--val-split`, `--max-per-class` (`--quick`), `--train-per-class`,
`--verify-images` and the test split mean the same thing everywhere. The files of a
folder are decided once, by the scan of tl/engine/images.py (`CheckedImageFolder`).

A search for a recipe's numbers (experiments/tune.py) asks for an *inner* split
(`inner_val` or `folds`): train/ alone is read and split into inner train and inner val,
and val/ and test/ are not opened at all (`inner_split`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from torchvision import datasets
from torchvision.transforms import v2

from tl import TLError
from tl.engine.class_names import one_line
from tl.engine.images import PHASES, CheckedImageFolder, check_layout, class_folders


def image_datasets(
    root: str | os.PathLike,
    transforms: dict[str, v2.Compose],
    *,
    max_per_class: int | None = None,
    verify: bool = False,
    phases: tuple[str, ...] = ("train", "val"),
    follow_links: bool = False,
) -> dict[str, CheckedImageFolder]:
    """One `CheckedImageFolder` for each of `phases` (all required) under `root`.

    `max_per_class` keeps the first N files of each class (sorted by name, so the subset
    is the same on every machine): the `--quick` smoke runs use it. Files reached through
    links that leave `root` are left out unless `follow_links` (images.scan_classes).
    """
    check_layout(root, phases)
    sets = {p: CheckedImageFolder(Path(root) / p, transforms[p], verify=verify, within=root,
                                  follow_links=follow_links) for p in phases}
    for ds in sets.values():
        refuse_empty_classes(ds, root)
        if max_per_class is not None:
            _keep_samples(ds, _first_per_class(ds.samples, max_per_class))
    _refuse_shared_files(sets)
    return sets


def refuse_empty_classes(ds: CheckedImageFolder, root: str | os.PathLike) -> None:
    counts = Counter(ds.targets)
    empty = [c for i, c in enumerate(ds.classes) if counts[i] == 0]
    if empty:
        outside = "".join(f"\n  {path} leads to {real}" for path, real in ds.outside[:3])
        hint = (f"; {len(ds.outside)} file(s) of {ds.root} are reached through links that leave {root} and were "
                f"left out (pass --follow-links to include them):{outside}") if ds.outside else ""
        raise TLError(f"no usable image in class folder(s) {empty} of {ds.root}{hint}")


def _refuse_shared_files(sets: dict[str, CheckedImageFolder]) -> None:
    """Stop if one file (a link, or the same inode) is a sample of two phases: val would
    then score the model on images it trained on, and look better than it is."""
    seen: dict[tuple[int, int], tuple[str, str]] = {}
    shared = []
    for phase, ds in sets.items():
        for path, _ in ds.samples:
            st = os.stat(path)
            other = seen.setdefault((st.st_dev, st.st_ino), (phase, path))
            if other[0] != phase:
                shared.append(f"{path} is {other[1]}")
    if shared:
        raise TLError(f"{len(shared)} file(s) belong to two splits (e.g. {shared[0]}): the model would be scored "
                      f"on images it trained on. Keep each image in one split only")


def _first_per_class(samples: list[tuple[str, int]], n: int) -> list[tuple[str, int]]:
    """The first `n` samples of each class, in the given order."""
    taken: Counter = Counter()
    keep = []
    for path, target in samples:
        if taken[target] < n:
            keep.append((path, target))
            taken[target] += 1
    return keep


class TooFewImages(TLError):
    """A class has fewer usable images than a --train-per-class draw asks for."""


def nested_draw(samples: list[tuple[str, int]], classes: list[str], n: int, seed: int = 0) -> list[tuple[str, int]]:
    """A seeded, class-balanced draw of `n` samples per class, in class then path order.

    Each class's files (sorted by path, so every machine starts from the same list) are
    shuffled once by a generator seeded with (`seed`, class name), and the first `n` are
    kept. The shuffle does not depend on `n`, so the draw for n is a prefix of the draw
    for any larger n: the subsets of a data-efficiency curve are nested, and a point with
    more images only adds images. (The first n files by name would not be a random draw:
    names often follow the order the photos were collected in.)"""
    keep = []
    for target, name in enumerate(classes):
        items = sorted(s for s in samples if s[1] == target)
        if len(items) < n:
            raise TooFewImages(f"class {name} has {len(items)} usable training image(s), fewer than the {n} per class "
                          f"asked for (--train-per-class): choose a smaller number")
        random.Random(f"{seed}:{name}").shuffle(items)
        keep += sorted(items[:n])
    return keep


def keep_train_per_class(ds: datasets.ImageFolder, n: int, seed: int = 0) -> None:
    """`--train-per-class N`: restrict a training set to `nested_draw`'s N images per class."""
    _keep_samples(ds, nested_draw(ds.samples, ds.classes, n, seed))


def fraction_draw(samples: list[tuple[str, int]], classes: list[str], fractions: dict[str, float],
                  seed: int = 0) -> list[tuple[str, int]]:
    """The samples, with only a seeded `fractions[name]` of the classes it names (at least one
    image each): an unbalanced training set made from a balanced one (experiments/imbalance.py).
    Each class is shuffled as `nested_draw` shuffles it, so the images kept are the first of
    that class's draw, the same for every fraction and nested like it."""
    if unknown := sorted(set(fractions) - set(classes)):
        raise TLError(f"--train-fraction names {', '.join(unknown)}, not a class of this data set ({classes})")
    if bad := [f"{name}={f}" for name, f in fractions.items() if not 0 < f <= 1]:
        raise TLError(f"--train-fraction keeps a fraction between 0 and 1 of a class, not {', '.join(bad)}")
    keep = []
    for target, name in enumerate(classes):
        items = sorted(s for s in samples if s[1] == target)
        if name in fractions:
            random.Random(f"{seed}:{name}").shuffle(items)
            items = sorted(items[:max(1, round(fractions[name] * len(items)))])
        keep += items
    return keep


def _keep_samples(ds: datasets.ImageFolder, samples: list[tuple[str, int]]) -> None:
    """Restrict an ImageFolder to `samples` (ImageFolder keeps the list under three names)."""
    ds.samples = ds.imgs = samples
    ds.targets = [t for _, t in samples]


def describe_skipped(sets: dict[str, CheckedImageFolder], show: int = 5) -> str | None:
    """The scan's report: folders that are not classes, files counted once although reachable
    under several names, and the files left out with the reason (the first few, then a count)."""
    ignored = [f for ds in sets.values() for f in getattr(ds, "ignored", [])]
    duplicates = [d for ds in sets.values() for d in getattr(ds, "duplicates", [])]
    skipped = [s for ds in sets.values() for s in ds.skipped]
    lines = describe_links(sets, show)
    not_images = [s for ds in sets.values() for s in getattr(ds, "not_images", [])]
    lines += _listed(f"left out {len(not_images)} file(s) that are not images this project trains on:",
                     not_images, show)
    if ignored:
        lines.append(f"ignored {len(ignored)} folder(s) that are not classes (hidden or system folders): "
                     + ", ".join(path for path, _ in ignored[:show]) + (" ..." if len(ignored) > show else ""))
    if duplicates:
        path, same = duplicates[0]
        lines.append(f"counted {len(duplicates)} file path(s) once: they reach a file already counted, through a "
                     f"link (e.g. {path} is {same})")
    lines += _listed(f"skipped {len(skipped)} unusable image file(s):", skipped, show)
    return "\n".join(map(one_line, lines)) or None  # a name's line feed or escape shown as \\n, \\x1b: one line each


def _listed(title: str, files: list[tuple[str, str]], show: int) -> list[str]:
    """`title`, then the first `show` (path, why) lines and a count of the rest; nothing for no files."""
    if not files:
        return []
    more = [f"  ... and {len(files) - show} more"] if len(files) > show else []
    return [title, *(f"  {path}: {why}" for path, why in files[:show]), *more]


def describe_links(sets: dict[str, CheckedImageFolder], show: int = 5) -> list[str]:
    """Files reached through links that leave the data folder: how many, and where the links lead."""
    outside = [o for ds in sets.values() for o in getattr(ds, "outside", [])]
    if not outside:
        return []
    follow = any(getattr(ds, "follow_links", False) for ds in sets.values())
    places = sorted({os.path.dirname(real) for _, real in outside})
    return [f"{len(outside)} file(s) are reached through links that leave the data folder, into "
            f"{', '.join(places[:show])}{' ...' if len(places) > show else ''}: "
            + ("included (--follow-links)" if follow else "left out (pass --follow-links to include them)"),
            *[f"  {path} -> {real}" for path, real in outside[:show]]]


def split_datasets(root: str | os.PathLike, transforms: dict[str, v2.Compose], val_fraction: float, *,
                   split_seed: int = 0, max_per_class: int | None = None,
                   verify: bool = False, follow_links: bool = False) -> dict[str, CheckedImageFolder]:
    """`--val-split 0.2`: train/val from a folder of class folders with no split of its own.

    Per class, a shuffle seeded with `split_seed` sends `val_fraction` of the files to val,
    the rest to train (nothing is copied: both data sets read the same files). The split has
    its own seed, not the training seed: runs that compare seeds must score on the same val
    images. `max_per_class` (--quick) then keeps the first N of each class in each split, so
    a quick run's val images are a subset of the full run's.
    """
    root = Path(root)
    if not 0 < val_fraction < 1:
        raise TLError(f"--val-split must be between 0 and 1 (a fraction such as 0.2), got {val_fraction}")
    if not root.is_dir():
        raise TLError(f"data folder not found: {root}")
    names = class_folders(root)[0]
    if phases := [p for p in PHASES if p in names]:
        raise TLError(f"{root} is already split ({', '.join(p + '/' for p in phases)}): --val-split would train "
                      f"classes named {' and '.join(phases)}. Drop --val-split to use its split, or pass "
                      f"--data {root / phases[0]} to split that folder")
    if len(names) < 2:  # a classifier of one class has nothing to tell apart (config.json needs 2 or more)
        raise TLError(f"--val-split needs a folder of 2 or more class folders; {root} has {len(names)}")
    scanned = CheckedImageFolder(root, transforms["train"], verify=verify, within=root,  # one scan of the headers
                                 follow_links=follow_links)
    if scanned.outside:  # say why a class came out empty
        refuse_empty_classes(scanned, root)
    rng = random.Random(split_seed)
    keep: dict[str, list] = {"train": [], "val": []}
    too_small = []
    for target, name in enumerate(scanned.classes):
        items = [s for s in scanned.samples if s[1] == target]
        rng.shuffle(items)
        n_val = round(len(items) * val_fraction)
        if not 0 < n_val < len(items):  # one of the two splits would have none of this class
            too_small.append(f"{name} ({len(items)} usable image(s) -> {n_val} val, {len(items) - n_val} train)")
        keep["val"] += sorted(items[:n_val])
        keep["train"] += sorted(items[n_val:])
    if too_small:
        raise TLError(f"--val-split {val_fraction} leaves a split without a class: {'; '.join(too_small)}. "
                      f"Every class needs images in both train and val: add images, or choose another fraction")
    sets = {"train": scanned, "val": _second_view(scanned, transforms["val"])}
    for phase, ds in sets.items():
        _keep_samples(ds, keep[phase] if max_per_class is None else _first_per_class(keep[phase], max_per_class))
    return sets


def _second_view(ds: CheckedImageFolder, transform) -> CheckedImageFolder:
    """The same scanned files under another transform, with a sample list of its own."""
    view = copy.copy(ds)
    view.transform = transform
    for report in ("skipped", "duplicates", "ignored", "not_images", "outside"):
        setattr(view, report, [])  # the scan's report is shown once
    return view


def inner_split(samples: list[tuple[str, int]], classes: list[str], *, fraction: float | None = None,
                folds: int | None = None, fold: int = 0, seed: int = 0) -> tuple[list, list]:
    """(inner train, inner val): training images split again, for choosing a recipe's numbers.

    Why: a search tries many settings and keeps the one that scored best. Scored on val or
    test, the winner's number is the maximum of many noisy measurements of those very
    images, and it flatters the winner; the real val and test then no longer measure
    anything honestly. So the search scores on images carved from train, and the real
    val and test stay unseen until the chosen recipe is trained and scored like any other.

    Per class, the files (sorted by path) are shuffled by a generator seeded with
    (`seed`, class name). `fraction`: the first round(fraction * n) of them, at least one
    and at most n - 1, are inner val. `folds` = K: the shuffled files are dealt round-robin
    into K folds and fold `fold` is inner val, so the K folds together score every training
    image once. Both are class-balanced: each class gives the same share."""
    train, val, too_small = [], [], []
    for target, name in enumerate(classes):
        items = sorted(s for s in samples if s[1] == target)
        random.Random(f"inner:{seed}:{name}").shuffle(items)
        if folds:
            held = items[fold::folds] if len(items) >= folds else []
        else:
            held = items[:min(max(1, round(len(items) * fraction)), len(items) - 1)]
        if not held:
            too_small.append(f"{name} ({len(items)} usable training image(s))")
        val += sorted(held)
        train += sorted(set(items) - set(held))
    if too_small:
        need = f"at least --folds {folds}" if folds else "at least 2"
        raise TLError(f"too few training images to carve an inner val from: {', '.join(too_small)}; every class "
                      f"needs {need} (one for inner train, one for inner val): add images, or choose fewer folds")
    return train, val


def _inner_sets(train: CheckedImageFolder, val_transform, choice: ImageChoice) -> dict[str, CheckedImageFolder]:
    """Inner train and inner val, both from the scanned train/ (`inner_split`)."""
    if choice.folds is None and not 0 < choice.inner_val < 1:
        raise TLError(f"--inner-val must be between 0 and 1 (a fraction such as 0.2), got {choice.inner_val}")
    if choice.folds is not None and not 0 <= choice.inner_fold < choice.folds or choice.folds == 1:
        raise TLError(f"--folds must be at least 2 and the inner fold one of 0 .. folds - 1, got --folds "
                      f"{choice.folds}, fold {choice.inner_fold}")
    keep_train, keep_val = inner_split(train.samples, train.classes, fraction=choice.inner_val, folds=choice.folds,
                                       fold=choice.inner_fold, seed=choice.split_seed)
    sets = {"train": train, "val": _second_view(train, val_transform)}
    _keep_samples(sets["train"], keep_train)
    _keep_samples(sets["val"], keep_val)
    return sets


@dataclass(frozen=True)
class ImageChoice:
    """The options that choose a run's images, with the meaning they have everywhere."""

    data: Path
    val_split: float | None = None  # a folder of class folders: hold out this fraction per class as val
    split_seed: int = 0  # the seed of that split and of the --train-per-class draw alone
    max_per_class: int | None = None  # the first N files of each class in each split (--quick: 8)
    train_per_class: int | None = None  # then train on a seeded, nested draw of N per class
    train_fraction: dict[str, float] | None = None  # then keep a seeded fraction of these classes' training images
    verify_images: bool = False  # decode every image fully while scanning (finds truncated files)
    follow_links: bool = False  # include files reached through links that leave the data folder
    inner_val: float | None = None  # tuning: this fraction of each class of train/ is inner val; val/, test/ unread
    folds: int | None = None  # tuning, instead: train/ dealt into K folds per class, fold `inner_fold` is inner val
    inner_fold: int = 0

    @classmethod
    def of(cls, options) -> ImageChoice:
        """The choice recorded in a RunOptions, or in anything with the same field names (one that
        lacks a field, such as --evaluate's ModelContext the inner split, gets its default)."""
        return cls(**{f.name: getattr(options, f.name, f.default) for f in dataclasses.fields(cls)})


def select_images(choice: ImageChoice, transforms: dict, phases: tuple[str, ...] | None = None,
                  log=print) -> dict[str, CheckedImageFolder]:
    """THE function that chooses which images each phase holds, for every reader of a data set.

    `phases`: the splits wanted; by default train and val, and test where `data/test/` exists
    (scanned with them, so a broken or shared test file stops a run before it trains). With
    `val_split` the folder holds class folders only: train and val are split from it, seeded,
    and it has no test split. Then `max_per_class` keeps the first N of each class in each
    split, `train_per_class` draws the training images and `train_fraction` keeps a seeded part
    of some classes' training images (val and test are untouched: `fraction_draw`). What
    the scan left out is reported through `log`, never dropped silently.

    With `inner_val` or `folds` (a search, experiments/tune.py) train and val are the inner
    train and inner val carved from train (`inner_split`), before the draws above; val/ and
    test/ are not read (with `val_split`, the one folder is scanned, its val part unused).
    """
    data = Path(choice.data)
    inner = choice.inner_val is not None or choice.folds is not None
    if inner and phases is not None and "test" in phases:
        raise TLError("an inner split (tuning) is carved from train/ alone: it has no test split")
    if inner and not choice.val_split:
        phases = ("train",)  # val/ and test/ are not even listed
    if choice.val_split:
        if phases is not None and "test" in phases:
            raise TLError(f"{data} was split with --val-split {choice.val_split} into train and val: "
                          f"it has no test split")
        sets = split_datasets(data, transforms, choice.val_split, split_seed=choice.split_seed,
                              max_per_class=choice.max_per_class, verify=choice.verify_images,
                              follow_links=choice.follow_links)
        report = describe_skipped(sets)  # of the one folder both splits come from (train's set holds it)
        sets = {p: ds for p, ds in sets.items() if phases is None or p in phases}
    else:
        phases = phases or (("train", "val", "test") if (data / "test").is_dir() else ("train", "val"))
        sets = image_datasets(data, transforms, max_per_class=choice.max_per_class, verify=choice.verify_images,
                              phases=phases, follow_links=choice.follow_links)
        report = describe_skipped(sets)
    if inner:
        sets = _inner_sets(sets["train"], transforms["val"], choice)
    if choice.train_per_class and "train" in sets:  # data-efficiency studies: nested, class-balanced
        keep_train_per_class(sets["train"], choice.train_per_class, choice.split_seed)
    if choice.train_fraction and "train" in sets:  # unbalanced classes made on purpose, seeded
        train = sets["train"]
        _keep_samples(train, fraction_draw(train.samples, train.classes, choice.train_fraction, choice.split_seed))
    if report:
        log(report)
    return sets
