"""Images on disk -> normalised tensors -> the phase-dict of DataLoaders.

Every source document builds the same three things (002 §1.3 steps 2-3, 003 §1):
a transform per phase, a Dataset per phase, and a dict ``{"train": loader,
"val": loader}`` that the loop walks phase by phase. This module builds them from
a folder laid out the way ``torchvision.datasets.ImageFolder`` expects::

    DATA/train/<class>/*.jpg     DATA/val/<class>/*.jpg     [DATA/test/<class>/*.jpg]

The class names (and so the number of outputs of the new head) come from the
folder names; nothing here assumes two classes.
"""

from __future__ import annotations

import copy
import os
import random
import re
import shutil
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from tl import TLError, distributed

PHASES = ("train", "val", "test")
# torchvision's list of still-image extensions. It leaves out ".gif" on purpose,
# which is why hymenoptera's `train/ants/imageNotFound.gif` placeholder is not a sample.
IMAGE_EXTENSIONS = IMG_EXTENSIONS
DEFAULT_DATA_DIR = Path("data/hymenoptera_data")
HYMENOPTERA_URL = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"


# ----------------------------------------------------------------------------- transforms
def val_resize(size: int) -> int:
    """The shorter side the val transform resizes to before cropping `size`: 256 for 224."""
    return round(size * 256 / 224)


def build_transforms(
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    size: int = 224,
    resize: int | None = None,
    augment: bool = True,
    policy: str = "standard",
) -> dict[str, v2.Compose]:
    """The two pipelines of document 002 §1.3 (`ImageTransform`), with torchvision v2.

    train: a random crop covering 50-100% of the image, resized to `size`, and a coin-flip
           mirror: each epoch sees a slightly different picture, which is how 244 photos
           can train a network without being memorised at once.
    val:   deterministic. Resize the *shorter side* to `resize` (256), then cut the central
           `size` (224) square. The order matters: 003 crops first and resizes after,
           which yields 256-pixel images and throws away most of each photo (docs/ERRATA.md).

    `mean`/`std` must be the ones the backbone's weights were trained with (ImageNet
    statistics for torchvision, 0.5 for the packaged EfficientNet-Lite0): the first
    convolution expects inputs on that scale. `augment=False` gives the train phase
    the val pipeline, which makes the train features deterministic (and cacheable).
    `resize` defaults to 002's ratio, 256 for a 224 crop (73 for the 64-pixel smoke runs).

    `policy` picks the train augmentation a recipe asks for:
      "standard"  the crop of 50-100% above (002's `scale=(0.5, 1.0)`);
      "tutorial"  torchvision's default crop of 8-100% of the image, as the PyTorch
                  transfer-learning tutorial uses it (`RandomResizedCrop(224)`);
      "strong"    that 8-100% crop, the flip, and TrivialAugmentWide (Müller & Hutter 2021:
                  one random photometric or geometric operation of random strength per
                  image), the augmentation of torchvision's current training recipes.
    """
    if policy not in ("standard", "tutorial", "strong"):
        raise ValueError(f"unknown augmentation policy {policy!r}")
    resize = resize if resize is not None else val_resize(size)
    to_float = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]  # uint8 -> [0,1] -> z-scores
    val = v2.Compose([v2.ToImage(), v2.Resize(resize, antialias=True), v2.CenterCrop(size), *to_float])
    if not augment:
        return {"train": val, "val": val, "test": val}
    scale = (0.5, 1.0) if policy == "standard" else (0.08, 1.0)  # fraction of the image area a crop covers
    train = v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(size, scale=scale, antialias=True),
        v2.RandomHorizontalFlip(),
        *([v2.TrivialAugmentWide()] if policy == "strong" else []),  # on uint8 pixels, before scaling
        *to_float,
    ])
    return {"train": train, "val": val, "test": val}


# ----------------------------------------------------------------------------- reading images
# Guards checked on the header, before a single pixel is decoded. Decoding allocates
# width x height x 3 bytes and the val transform resizes the *shorter* side to 256, so a
# tiny file can ask for gigabytes: a 375-byte 100000x1 PNG would become 256 x 25,600,000.
MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS): about 9500 x 9500
MAX_ASPECT = 20  # longer side / shorter side; a panorama is ~4, a 20:1 strip is not a photo of a class
# The PIL modes `to_rgb` turns into correct RGB. Others (e.g. "LAB") are skipped with a reason.
_TO_RGB_MODES = frozenset({"1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "LA", "La", "PA", "CMYK", "YCbCr", "HSV",
                           "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})

# Folders that are never classes: tool and file-system droppings, not photos of anything.
# Hidden folders (".thumbs", ".ipynb_checkpoints", ".git") are never classes either.
SYSTEM_FOLDERS = frozenset({"__MACOSX", "__pycache__", "@eaDir", "lost+found", "$RECYCLE.BIN",
                            "System Volume Information"})


class UnusableImage(ValueError):
    """An image file that is not used, with the reason (the message) a report shows."""


def has_image_extension(path: str | os.PathLike) -> bool:
    """True for visible files whose extension is a still-image format (`.DS_Store`, `.txt`,
    `.gif` placeholders are not samples)."""
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _header_problem(img: Image.Image) -> str | None:
    """Why an opened (not yet decoded) image must not be decoded, or None."""
    w, h = img.size
    if w < 1 or h < 1:
        return f"empty image ({w}x{h})"
    if w * h > MAX_PIXELS:
        return f"too many pixels: {w}x{h} = {w * h:,} > {MAX_PIXELS:,} (decoding would need {w * h * 3 / 2**30:.1f} GB)"
    if max(w, h) > MAX_ASPECT * min(w, h):
        return f"extreme aspect ratio {w}x{h} (more than {MAX_ASPECT}:1): resizing it would need gigabytes"
    if img.mode not in _TO_RGB_MODES:
        return f"colour mode {img.mode} is not supported: convert the file to RGB"
    return None


def _open(path: str | os.PathLike) -> Image.Image:
    """`Image.open` with our guards: raises UnusableImage (with the reason) for a file that
    is empty, not an image, or too big / too thin to decode safely. Reads the header only."""
    if os.path.getsize(path) == 0:
        raise UnusableImage("empty file")
    try:
        with warnings.catch_warnings():
            # our MAX_PIXELS check below replaces PIL's warning; its hard error (2x) is caught here
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise UnusableImage(f"too many pixels ({str(exc).split(',')[0]})") from None
    except (OSError, ValueError, SyntaxError) as exc:  # PIL's ways of saying "not an image I know"
        raise UnusableImage(_reason(exc)) from None
    if (problem := _header_problem(img)) is not None:
        img.close()
        raise UnusableImage(problem)
    return img


def _reason(exc: BaseException) -> str:
    """One short line for a report ("UnidentifiedImageError: cannot identify image file ...")."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:120]}" if text else type(exc).__name__


def _to_8bit(values: np.ndarray, mode: str) -> np.ndarray:
    """Gray values of any bit depth -> uint8 0..255.

    16-bit modes declare their range (0..65535), so they are divided by 257 (65535 -> 255).
    Mode "I" (32-bit integer) and "F" (float) declare none: a 32-bit TIFF may hold 0..255,
    0..65535 or anything. We take the smallest usual range that holds the values ([0, 1] for
    floats, then 0..255, then 0..65535) and stretch min..max only when none does. Dividing
    an "I" image of 0..255 values by 256, as the 16-bit rule would, makes it all black."""
    values = np.nan_to_num(values.astype(np.float64))
    lo, hi = float(values.min()), float(values.max())
    if mode.startswith("I;16"):
        scale, offset = 255 / 65535, 0.0
    elif lo >= 0 and hi <= 1 and mode == "F":
        scale, offset = 255.0, 0.0
    elif lo >= 0 and hi <= 255:
        scale, offset = 1.0, 0.0
    elif lo >= 0 and hi <= 65535:
        scale, offset = 255 / 65535, 0.0
    else:
        scale, offset = 255 / max(hi - lo, 1e-12), lo  # (a constant image becomes black, not NaN)
    return np.clip(np.rint((values - offset) * scale), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any supported PIL mode -> 8-bit RGB, the 3 channels the first convolution was trained on.

    gray of any depth ("1", "L", "I;16*", "I", "F") -> scaled to 0..255 (`_to_8bit`), then RGB;
    with alpha ("RGBA", "LA", "PA", "La", "RGBa", or a palette / tRNS transparency) -> composited
    on white, so transparent pixels are not black; "P", "CMYK", "YCbCr", "HSV" -> PIL's conversion.
    """
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = Image.fromarray(_to_8bit(np.asarray(img), img.mode), "L")
    if img.mode == "La":  # premultiplied gray + alpha: PIL converts it only to LA
        img = img.convert("LA")
    if "A" in img.mode or "a" in img.mode or "transparency" in img.info:
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("RGB")



def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open any still image as 8-bit RGB, with the header guards of `_open` (UnusableImage)."""
    with _open(path) as img:
        img.load()  # the full decode: a truncated file raises OSError here
        return to_rgb(img)


def _looks_complete(path: str, fmt: str | None) -> bool:
    """A cheap test for truncation: does the file end the way its format ends?

    Most broken image files are cut-off downloads or copies. A JPEG ends with the marker
    FF D9, a PNG with its IEND chunk; reading the last kilobyte finds both. A file without
    the ending is decoded in full to decide (some cameras append data after FF D9; such a
    file decodes fine and is kept). Other formats have no such cheap test: always decoded."""
    if fmt not in ("JPEG", "MPO", "PNG"):  # MPO: a camera's JPEG with extra pictures appended
        return False
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 1024))
        tail = f.read()
    return (b"IEND" in tail) if fmt == "PNG" else (b"\xff\xd9" in tail)


def check_image(path: str, verify: bool = False) -> str | None:
    """Why `path` cannot be a sample, or None: the scan's decision, made once per file.

    Always: header guards (`_open`), and a full decode of any file that does not end the way
    its format ends (`_looks_complete`: truncation, at the cost of reading 1 kB). With
    `verify` (--verify-images): a full decode of every file, the slow and certain way."""
    try:
        with _open(path) as img:
            if verify or not _looks_complete(path, img.format):
                img.load()
                to_rgb(img)
    except UnusableImage as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - PIL decoders raise many types for broken data
        return _reason(exc)
    return None


def read_image(path: str) -> Image.Image:
    """`load_rgb` for a file the scan accepted. If it fails now (it changed since the scan, or
    is broken in a way only a full decode finds), stop with the file's name: never hand the
    loop another image in its place, which would train that image under this file's label."""
    try:
        return load_rgb(path)
    except (OSError, ValueError, SyntaxError) as exc:
        reason = str(exc) if isinstance(exc, UnusableImage) else _reason(exc)
        raise TLError(f"cannot decode {path} ({reason}); it passed the quick scan. Rerun with --verify-images, "
                      f"which decodes every file before training and skips the broken ones") from None


# ----------------------------------------------------------------------------- the data set definition
def ignored_folder(name: str) -> str | None:
    """Why a folder is never a class ("hidden", "system folder"), or None."""
    if name.startswith("."):
        return "hidden"
    return "system folder" if name in SYSTEM_FOLDERS else None


def class_folders(phase_dir: str | os.PathLike) -> tuple[list[str], list[tuple[str, str]]]:
    """(class names, ignored folders as (path, why)) of one phase folder: its visible,
    non-system sub-folders, sorted. THE rule for "which folders are classes"."""
    classes, ignored = [], []
    with os.scandir(phase_dir) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if not entry.is_dir():  # (is_dir follows a symlinked class folder)
                continue
            if (why := ignored_folder(entry.name)) is None:
                classes.append(entry.name)
            else:
                ignored.append((entry.path, why))
    return classes, ignored


def _raise(error: OSError) -> None:
    raise error  # os.walk's default is to skip an unreadable folder in silence


def walk_files(top: str, ignored: list | None = None):
    """Every file under `top`, sorted, depth first. Folder symlinks are followed, but each
    real folder is entered once: a link to a parent folder cannot loop. Hidden and system
    sub-folders are left out (and appended to `ignored`)."""
    seen = set()
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True, onerror=_raise):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        for d in sorted(dirnames):
            if (why := ignored_folder(d)) is not None and ignored is not None:
                ignored.append((os.path.join(dirpath, d), why))
        dirnames[:] = sorted(d for d in dirnames if ignored_folder(d) is None)
        for name in sorted(filenames):
            yield os.path.join(dirpath, name)


def scan_classes(root: str, classes: list[str], verify: bool = False) -> dict:
    """The files of each class folder under `root`: which are samples, which are not and why.

    Each real file is counted once. Identity is (device, inode), so a symlink and a hard
    link are the same file as their target. A file reached under several names belongs to
    the class folder that really contains it, the innermost one if class folders nest (a
    link inside bees/ to ../ants/ does not make ants into bees); a file that really lies in
    two classes' folders (hard links), or that two classes reach only through links, has
    no single label and is skipped.

    Returns samples [(path, class index)] in class then path order, skipped [(path, why)],
    duplicates [(path, the path it repeats)] and ignored [(folder, why)].
    """
    found: dict[tuple[int, int], list[tuple[int, str, bool]]] = {}
    order: list[tuple[int, str, tuple[int, int]]] = []
    skipped, ignored = [], []
    tops = [os.path.realpath(os.path.join(root, name)) for name in classes]
    for index, name in enumerate(classes):
        for path in walk_files(os.path.join(root, name), ignored):
            if not has_image_extension(path):
                continue
            try:
                st = os.stat(path)
            except OSError as exc:  # a link to nowhere, a link loop, no permission
                skipped.append((path, f"cannot be read ({exc.strerror})"))
                continue
            identity = (st.st_dev, st.st_ino)
            inside = os.path.realpath(path).startswith(tops[index] + os.sep)
            found.setdefault(identity, []).append((index, path, inside))
            order.append((index, path, identity))
    samples, duplicates = [], []
    for index, path, identity in order:
        places = found[identity]
        holders = {c for c, _, inside in places if inside}
        # a class folder that contains another (train/all -> train) does not own that class's files
        innermost = {c for c in holders if not any(tops[o].startswith(tops[c] + os.sep) for o in holders)}
        owners = innermost or {c for c, _, _ in places}
        first = next(p for c, p, _ in places if c in owners)
        if len(owners) > 1:
            others = ", ".join(classes[c] for c in sorted(owners) if c != index)
            skipped.append((path, f"the same file is also in class {others}: its label is ambiguous"))
        elif path != first:
            duplicates.append((path, first))
        elif (why := check_image(path, verify)) is not None:
            skipped.append((path, why))
        else:
            samples.append((path, index))
    ignored = list({os.path.realpath(path): (path, why) for path, why in ignored}.values())  # once each
    return {"samples": samples, "skipped": skipped, "duplicates": duplicates, "ignored": ignored}


class CheckedImageFolder(datasets.ImageFolder):
    """`ImageFolder` whose files are decided once, by `class_folders` and `scan_classes`.

    torchvision's ImageFolder takes every sub-folder as a class (a hidden `.thumbs/` too,
    shifting every label after it) and follows folder links without end. Here the scan at
    construction keeps only files that are images by extension, counted once, with a header
    that passes the guards and an ending that shows they are complete. What it leaves out is
    listed in `skipped` (path, why), `duplicates` (path, same file as) and `ignored` (folder, why).

    So training, the feature and image caches, --evaluate and --show-data all read the same
    `samples`. Should a file still fail to decode later, `__getitem__` stops with its name
    (`read_image`); it never substitutes another image, which would change numbers silently.
    """

    def __init__(self, root: str | os.PathLike, transform=None, *, verify: bool = False):
        self._verify = verify
        super().__init__(str(root), transform=transform, loader=read_image, allow_empty=True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes, self.ignored = class_folders(directory)
        return classes, {name: i for i, name in enumerate(classes)}

    def make_dataset(self, directory: str, class_to_idx: dict[str, int], *args, **kwargs) -> list[tuple[str, int]]:
        scan = scan_classes(directory, list(class_to_idx), self._verify)
        self.skipped, self.duplicates = scan["skipped"], scan["duplicates"]
        self.ignored = self.ignored + scan["ignored"]
        return scan["samples"]


# ----------------------------------------------------------------------------- folder layout
def _class_dirs(phase_dir: Path) -> list[str]:
    return class_folders(phase_dir)[0]


def check_layout(root: str | os.PathLike, phases: tuple[str, ...] = ("train", "val")) -> list[str]:
    """Check `root` before any training starts; return the phases present.

    Stops with a message that says what is wrong *and* what layout is expected, because
    `ImageFolder` alone would happily treat `train/` and `val/` as two classes (the
    mistake of document 003 §1, see docs/ERRATA.md) or fail deep inside a run.
    """
    root = Path(root)
    expected = (f"expected {root}/train/<class>/<images> and {root}/val/<class>/<images> "
                f"(optionally {root}/test/...), one folder per class")
    if not root.is_dir():
        raise TLError(f"data folder not found: {root}\n  {expected}")
    present = [p for p in PHASES if (root / p).is_dir()]
    missing = [p for p in phases if p not in present]
    if missing:
        hint = ""
        subdirs = _class_dirs(root)
        if subdirs and not present:
            hint = (f"\n  {root} holds class folders ({', '.join(subdirs[:5])}) but no train/val split: "
                    "pass --val-split 0.2 to split it, or arrange the folders as above")
        raise TLError(f"missing phase folder(s) {', '.join(missing)} in {root}\n  {expected}{hint}")
    classes = {}
    for phase in present:
        names = _class_dirs(root / phase)
        if not names:
            raise TLError(f"{root / phase} has no class folders\n  {expected}")
        for name in names:
            if not any(has_image_extension(f) for f in walk_files(str(root / phase / name))):
                raise TLError(f"class folder {root / phase / name} holds no image files")
        classes[phase] = names
    first = present[0]
    for phase in present[1:]:
        if classes[phase] != classes[first]:
            raise TLError(f"class folders differ between phases: {first}={classes[first]} "
                          f"but {phase}={classes[phase]}; every phase needs the same classes")
    return present


# ----------------------------------------------------------------------------- datasets & loaders
def image_datasets(
    root: str | os.PathLike,
    transforms: dict[str, v2.Compose],
    *,
    max_per_class: int | None = None,
    verify: bool = False,
    phases: tuple[str, ...] = ("train", "val"),
) -> dict[str, CheckedImageFolder]:
    """One `CheckedImageFolder` for each of `phases` (all required) under `root`.

    `max_per_class` keeps the first N files of each class (sorted by name, so the subset
    is the same on every machine): the `--quick` smoke runs use it.
    """
    check_layout(root, phases)
    sets = {p: CheckedImageFolder(Path(root) / p, transforms[p], verify=verify) for p in phases}
    for ds in sets.values():
        counts = Counter(ds.targets)
        empty = [c for i, c in enumerate(ds.classes) if counts[i] == 0]
        if empty:
            raise TLError(f"no usable image in class folder(s) {empty} of {ds.root}")
        if max_per_class is not None:
            _keep_samples(ds, _first_per_class(ds.samples, max_per_class))
    _refuse_shared_files(sets)
    return sets


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
            raise TLError(f"class {name} has {len(items)} usable training image(s), fewer than the {n} per class "
                          f"asked for (--train-per-class): choose a smaller number")
        random.Random(f"{seed}:{name}").shuffle(items)
        keep += sorted(items[:n])
    return keep


def keep_train_per_class(ds: datasets.ImageFolder, n: int, seed: int = 0) -> None:
    """`--train-per-class N`: restrict a training set to `nested_draw`'s N images per class."""
    _keep_samples(ds, nested_draw(ds.samples, ds.classes, n, seed))


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
    lines = []
    if ignored:
        lines.append(f"ignored {len(ignored)} folder(s) that are not classes (hidden or system folders): "
                     + ", ".join(path for path, _ in ignored[:show]) + (" ..." if len(ignored) > show else ""))
    if duplicates:
        path, same = duplicates[0]
        lines.append(f"counted {len(duplicates)} file path(s) once: they reach a file already counted, through a "
                     f"link (e.g. {path} is {same})")
    if skipped:
        lines.append(f"skipped {len(skipped)} unusable image file(s):")
        lines += [f"  {path}: {why}" for path, why in skipped[:show]]
        if len(skipped) > show:
            lines.append(f"  ... and {len(skipped) - show} more")
    return "\n".join(lines) or None


def _seed_worker(worker_id: int) -> None:
    """Give each loader worker's `random` a seed derived from torch's per-worker seed,
    so augmentation that uses Python's RNG is reproducible too."""
    random.seed(torch.initial_seed() % 2**32)


def make_loaders(
    sets: dict[str, torch.utils.data.Dataset],
    batch_size: int,
    *,
    seed: int = 0,
    workers: int = 0,
    pin_memory: bool = False,
    generator: torch.Generator | None = None,
) -> dict[str, DataLoader]:
    """The phase-dict of DataLoaders that the loop walks (002 §1.3 step 3).

    Only train is shuffled. Its order comes from a `torch.Generator` (`generator`, or a new
    one seeded with `seed`; `loaders["train"].generator`): the checkpoint saves that
    generator's state, which is what lets a resumed run draw exactly the batches an
    uninterrupted run would have.
    Workers are not persistent for the same reason: each epoch's workers are seeded afresh
    from the generator.
    Under torchrun each process loads only its shard (`tl.distributed.sampler`): train's
    order then comes from `seed` + epoch, val's shards hold every image exactly once.
    """
    loaders = {}
    for phase, ds in sets.items():
        train = phase == "train"
        # [DDP] under torchrun: this process's shard of the phase (tl/distributed.py); None here otherwise
        sampler = distributed.sampler(ds, shuffle=train, seed=seed)
        loaders[phase] = DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            generator=(generator or torch.Generator().manual_seed(seed)) if train else None,
            num_workers=workers,
            worker_init_fn=_seed_worker if workers else None,
            pin_memory=pin_memory,  # page-locked host memory: faster, asynchronous copies to a GPU
        )
    return loaders


class DecodedImages(torch.utils.data.Dataset):
    """Every image of `folder` decoded once and resized (shorter side `resize`), kept as
    uint8 tensors (3, H, W), so epochs after the first do no JPEG decoding.

    The folder's own transform still runs on each access: the random crop and flip of the
    train phase stay random. The val pipeline's `Resize(resize)` then has nothing left to
    do, so val tensors are the same as without the cache; train crops are cut from the
    resized image instead of the full-size photo, a small difference in sharpness.

    `device` (`--device-images`): keep the tensors on the training device instead, so the
    crop, flip and normalisation run there too and the loop's `inputs.to(device)` has
    nothing left to copy. Why: a GPU trains a batch faster than CPU workers can decode and
    augment its JPEGs (results/benchmark_cuda.md measured the loop at 22-53% of its compute
    bound with 8 workers); decoded once, the images cost the GPU a few small kernels each.
    torchvision's v2 transforms run on CUDA tensors unchanged, and they draw their random
    crop and flip from torch's global CPU generator whatever the tensor's device, so the
    crops are the ones `--image-cache --workers 0` draws, and a checkpoint restores them.
    The transform runs in the loader's own process (CUDA tensors do not go to worker
    processes), one image at a time: every image gets its own crop, as on the CPU.
    """

    def __init__(self, folder: CheckedImageFolder, resize: int, device: torch.device | str | None = None):
        self.samples, self.targets, self.classes = folder.samples, folder.targets, folder.classes
        self.transform, self.root, self.skipped = folder.transform, folder.root, folder.skipped
        shrink = v2.Resize(resize, antialias=True)  # on the CPU, as the cache without `device`
        self.images = [shrink(v2.functional.pil_to_tensor(read_image(path))).to(device or "cpu")
                       for path, _ in folder.samples]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.targets[i]


def decoded_bytes(folder: CheckedImageFolder, resize: int) -> int:
    """The bytes `DecodedImages(folder, resize)` will hold, read from the image headers alone."""
    needed = 0
    for path, _ in folder.samples:
        with Image.open(path) as img:  # the header gives the size without decoding
            w, h = img.size
        needed += 3 * resize * round(resize * max(w, h) / min(w, h))
    return needed


def decoded_images(folder: CheckedImageFolder, resize: int, limit_gb: float, log=print,
                   device: torch.device | str | None = None):
    """`DecodedImages(folder, resize, device)` if its tensors fit in `limit_gb`, else `folder`
    unchanged (`--device-images` runs are refused before that, in `tl.engine.run.run`)."""
    needed = decoded_bytes(folder, resize)
    if needed > limit_gb * 2**30:
        log(f"image cache for {folder.root} would need {needed / 2**30:.2f} GB > {limit_gb} GB: decoding per epoch")
        return folder
    decoded = DecodedImages(folder, resize, device)
    if device is not None:
        log(f"image cache for {folder.root}: {len(decoded)} images, {needed / 2**30:.2f} GB on {device}")
    return decoded


# ----------------------------------------------------------------------------- where the data lives
def resolve_data_dir(arg: str | None) -> Path:
    """`--data DIR`, else `$TL_DATA_DIR`, else `data/hymenoptera_data` (downloaded on first use)."""
    if arg:
        return Path(arg)
    if os.environ.get("TL_DATA_DIR"):
        return Path(os.environ["TL_DATA_DIR"])
    if not DEFAULT_DATA_DIR.is_dir():
        download_hymenoptera(DEFAULT_DATA_DIR.parent)
    return DEFAULT_DATA_DIR


def download_hymenoptera(dest: str | os.PathLike) -> Path:
    """Fetch the PyTorch tutorial's ants-vs-bees archive into `dest` (needs the internet)."""
    from torchvision.datasets.utils import download_and_extract_archive

    if os.environ.get("TL_OFFLINE"):
        raise TLError(_offline_data_message(dest))
    dest = Path(dest)
    # what this call may create; on failure those that did not exist before are removed again,
    # so a failed download leaves no empty data/ (or half archive) that looks like data next time
    created = [p for p in (dest / Path(HYMENOPTERA_URL).name, dest / "hymenoptera_data", dest, *dest.parents)
               if not p.exists()]
    try:
        download_and_extract_archive(HYMENOPTERA_URL, download_root=str(dest))
    except Exception as exc:
        for p in created:  # deepest first
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        raise TLError(_offline_data_message(dest, exc)) from None
    return dest / "hymenoptera_data"


def _offline_data_message(dest, exc: Exception | None = None) -> str:
    why = f" ({type(exc).__name__}: {exc})" if exc else " (TL_OFFLINE is set)"
    return (f"no data folder given and the default could not be downloaded{why}.\n"
            f"  Either pass --data DIR (a folder with train/ and val/ class folders), set TL_DATA_DIR,\n"
            f"  or go online once so {HYMENOPTERA_URL} can be unpacked into {dest}/.")


# ----------------------------------------------------------------------------- dogs vs cats (document 000)
KAGGLE_NAME = re.compile(r"^(cat|dog)\.(\d+)\.jpg$", re.IGNORECASE)
SPLIT_FRACTIONS = (("train", 0.64), ("val", 0.18), ("test", 0.18))  # 000: 16,000 / 4,500 / 4,500 of 25,000


PREPARED_MARK = ".made-by-tl-prepare"  # written into each split folder that --prepare creates


def prepare_dogs_vs_cats(src: str | os.PathLike, dest: str | os.PathLike, *, force: bool = False,
                         log=print) -> dict:
    """Split Kaggle's flat `train/` folder (`cat.123.jpg`, `dog.45.jpg`) into
    `dest/{train,val,test}/{cat,dog}/`, as document 000 does.

    Per class, files are ordered by the index in their name; the first 64% go to train, the
    next 18% to val, the rest to test (8,000 / 2,250 / 2,250 per class on the full 25,000),
    so the same input always gives the same split. Files are hard-linked where the file
    system allows (no second copy on disk), else symlinked, else copied. Names that do not
    match `cat.N.jpg` / `dog.N.jpg` are reported and left out.

    Nothing the user owns is deleted: `src` and `dest` may not overlap (`--src D/train
    --dest D` would make D/train the output), a non-empty `dest` is refused, and `force`
    replaces only split folders that carry the mark this function leaves in each one.
    """
    src, dest = Path(src), Path(dest)
    if not src.is_dir():
        raise TLError(f"--src {src} is not a folder (expected Kaggle's dogs-vs-cats train/ with cat.N.jpg files)")
    real_src, real_dest = src.resolve(), dest.resolve()
    if real_src == real_dest or real_dest in real_src.parents or real_src in real_dest.parents:
        raise TLError(f"--dest {dest} and --src {src} overlap; the split would be written into (and with --force "
                      f"replace) the source photos. Choose a --dest outside {src}, e.g. {src.parent / 'prepared'}")
    by_class: dict[str, list[tuple[int, Path]]] = {"cat": [], "dog": []}
    ignored = []
    for path in sorted(src.iterdir()):
        m = KAGGLE_NAME.match(path.name)
        if m and path.is_file():
            by_class[m.group(1).lower()].append((int(m.group(2)), path))
        else:
            ignored.append(path.name)
    if not all(by_class.values()):
        raise TLError(f"{src} has no cat.N.jpg or no dog.N.jpg files: is it Kaggle's dogs-vs-cats train/ folder?")
    if dest.exists() and not dest.is_dir():
        raise TLError(f"--dest {dest} is a file, not a folder: choose a new or empty folder")
    if dest.exists() and any(dest.iterdir()):
        splits = [dest / phase for phase, _ in SPLIT_FRACTIONS if (dest / phase).exists()]
        ours = [d for d in splits if (d / PREPARED_MARK).is_file()]
        if not force:
            hint = (" (its split folders were made by --prepare: --force replaces them)" if ours == splits and ours
                    else "")
            raise TLError(f"{dest} is not empty; choose a new or empty --dest{hint}")
        if foreign := [d for d in splits if d not in ours]:
            raise TLError(f"--force replaces only splits made by --prepare, and {foreign[0]} was not (it has no "
                          f"{PREPARED_MARK}); move it away or choose another --dest")
        for folder in ours:
            shutil.rmtree(folder)  # links and copies we made; a hard link's source keeps its own name
    created = []
    try:
        counts, methods = _write_splits(by_class, dest, created)
    except BaseException:
        for folder in created:  # a half-written split is worse than none
            shutil.rmtree(folder, ignore_errors=True)
        raise
    log(f"prepared {dest}: " + "; ".join(f"{p} " + ", ".join(f"{c} {k}" for c, k in v.items())
                                         for p, v in counts.items()))
    log("files " + ", ".join(f"{how} {k}" for how, k in methods.items()))
    if ignored:
        log(f"left out {len(ignored)} file(s) not named cat.N.jpg / dog.N.jpg: {', '.join(ignored[:5])}"
            + (" ..." if len(ignored) > 5 else ""))
    return {"counts": counts, "methods": dict(methods), "ignored": ignored}


def _write_splits(by_class: dict[str, list[tuple[int, Path]]], dest: Path, created: list[Path]):
    """Fill dest/{train,val,test}/{cat,dog}/; each split folder is marked, then appended to
    `created`, before any file goes in, so a failure can remove exactly what was made."""
    counts: dict[str, dict[str, int]] = {}
    methods: Counter = Counter()
    for phase, _ in SPLIT_FRACTIONS:
        (dest / phase).mkdir(parents=True)
        created.append(dest / phase)
        (dest / phase / PREPARED_MARK).write_text("made by main.py --prepare; --force may replace this folder\n")
    for name, files in by_class.items():
        files.sort()  # by index: cat.2 before cat.10
        n = len(files)
        n_train, n_val = round(n * SPLIT_FRACTIONS[0][1]), round(n * SPLIT_FRACTIONS[1][1])
        bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}
        for phase, (lo, hi) in bounds.items():
            folder = dest / phase / name
            folder.mkdir()
            for _, path in files[lo:hi]:
                target = folder / path.name
                methods[_link_or_copy(path, target)] += 1
                if not target.is_file():  # a link that leads nowhere is not a prepared image
                    raise TLError(f"{target} does not lead to a readable file after linking it to {path}")
            counts.setdefault(phase, {})[name] = hi - lo
    return counts, methods


def _link_or_copy(src: Path, dst: Path) -> str:
    try:
        os.link(src, dst)  # same file, second name: no extra disk space
        return "hard-linked"
    except OSError:
        pass
    try:
        dst.symlink_to(src.resolve())
        return "symlinked"
    except OSError:
        shutil.copy2(src, dst)
        return "copied"


def split_datasets(root: str | os.PathLike, transforms: dict[str, v2.Compose], val_fraction: float, *,
                   split_seed: int = 0, max_per_class: int | None = None,
                   verify: bool = False) -> dict[str, CheckedImageFolder]:
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
    names = _class_dirs(root)
    if phases := [p for p in PHASES if p in names]:
        raise TLError(f"{root} is already split ({', '.join(p + '/' for p in phases)}): --val-split would train "
                      f"classes named {' and '.join(phases)}. Drop --val-split to use its split, or pass "
                      f"--data {root / phases[0]} to split that folder")
    if not names:
        raise TLError(f"--val-split needs a folder of class folders; {root} has none")
    scanned = CheckedImageFolder(root, transforms["train"], verify=verify)  # one scan of the headers
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
    sets = {"train": scanned, "val": copy.copy(scanned)}  # same files, own transform and sample list
    sets["val"].transform = transforms["val"]
    sets["val"].skipped, sets["val"].duplicates, sets["val"].ignored = [], [], []  # the report is shown once
    for phase, ds in sets.items():
        _keep_samples(ds, keep[phase] if max_per_class is None else _first_per_class(keep[phase], max_per_class))
    return sets


# Truncated JPEGs make PIL raise mid-decode; the scan skips such files (check_image) and
# read_image names one it meets later, so we keep PIL strict (never pad half an image with grey).
ImageFile.LOAD_TRUNCATED_IMAGES = False
