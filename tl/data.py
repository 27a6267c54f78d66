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

import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from tl import TLError

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
    """
    resize = resize if resize is not None else val_resize(size)
    to_float = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]  # uint8 -> [0,1] -> z-scores
    val = v2.Compose([v2.ToImage(), v2.Resize(resize, antialias=True), v2.CenterCrop(size), *to_float])
    if not augment:
        return {"train": val, "val": val, "test": val}
    train = v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        *to_float,
    ])
    return {"train": train, "val": val, "test": val}


# ----------------------------------------------------------------------------- reading images
def has_image_extension(path: str | os.PathLike) -> bool:
    """True for visible files whose extension is a still-image format (`.DS_Store`, `.txt`,
    `.gif` placeholders are not samples)."""
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open any still image as 8-bit RGB: grayscale, palette, CMYK, RGBA and 16-bit files
    all reach the network as the 3 channels its first convolution was trained on."""
    with Image.open(path) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit grayscale: PIL's convert("RGB") would clip at 255, so rescale to 8 bits.
            img = img.point(lambda v: v / 256).convert("L")
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, img)  # transparent pixels become white, not black
        return img.convert("RGB")


def _check_image(path: str, verify: bool) -> str | None:
    """Return why `path` is unusable, or None. Reads the header only unless `verify`."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with Image.open(path) as img:
            if verify:
                img.load()  # a full decode: catches truncated files, costs a JPEG decode each
    except Exception as exc:  # PIL raises many types for broken files
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
    return None


class CheckedImageFolder(datasets.ImageFolder):
    """`ImageFolder` that scans its files once and never dies mid-epoch on one bad file.

    The scan (at construction) keeps only files that have an image extension *and* an
    image header PIL can read; the rest are listed in `self.skipped` as (path, reason).
    If a file that passed the header check still fails to decode during an epoch (a
    truncated JPEG), `__getitem__` warns and returns the next readable sample instead
    of crashing an hour-long run.
    """

    def __init__(self, root: str | os.PathLike, transform=None, *, verify: bool = False):
        self.skipped: list[tuple[str, str]] = []

        def usable(path: str) -> bool:
            if not has_image_extension(path):
                return False
            reason = _check_image(path, verify)
            if reason is not None:
                self.skipped.append((path, reason))
            return reason is None

        # allow_empty: a class left with no usable file is reported by image_datasets, in our words
        super().__init__(str(root), transform=transform, loader=load_rgb, is_valid_file=usable, allow_empty=True)

    def __getitem__(self, index: int):
        for offset in range(len(self.samples)):
            i = (index + offset) % len(self.samples)
            try:
                return super().__getitem__(i)
            except (OSError, ValueError, SyntaxError) as exc:
                warnings.warn(f"skipping unreadable image {self.samples[i][0]}: {exc}", stacklevel=2)
        raise TLError(f"no readable image left in {self.root}")


# ----------------------------------------------------------------------------- folder layout
def _class_dirs(phase_dir: Path) -> list[str]:
    return sorted(d.name for d in phase_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


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
            if not any(has_image_extension(f) for f in os.listdir(root / phase / name)):
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
            taken: Counter = Counter()
            keep = []
            for path, target in ds.samples:
                if taken[target] < max_per_class:
                    keep.append((path, target))
                    taken[target] += 1
            _keep_samples(ds, keep)
    return sets


def _keep_samples(ds: datasets.ImageFolder, samples: list[tuple[str, int]]) -> None:
    """Restrict an ImageFolder to `samples` (ImageFolder keeps the list under three names)."""
    ds.samples = ds.imgs = samples
    ds.targets = [t for _, t in samples]


def describe_skipped(sets: dict[str, CheckedImageFolder], show: int = 5) -> str | None:
    """One short report of the files the scan left out (the first few, then a count)."""
    skipped = [s for ds in sets.values() for s in ds.skipped]
    if not skipped:
        return None
    lines = [f"skipped {len(skipped)} unusable image file(s):"]
    lines += [f"  {path}: {why}" for path, why in skipped[:show]]
    if len(skipped) > show:
        lines.append(f"  ... and {len(skipped) - show} more")
    return "\n".join(lines)


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
) -> dict[str, DataLoader]:
    """The phase-dict of DataLoaders that the loop walks (002 §1.3 step 3).

    Only train is shuffled. Its order comes from a `torch.Generator` owned by the loader
    (`loaders["train"].generator`): the checkpoint saves that generator's state, which is
    what lets a resumed run draw exactly the batches an uninterrupted run would have.
    Workers are not persistent for the same reason: each epoch's workers are seeded afresh
    from the generator.
    """
    loaders = {}
    for phase, ds in sets.items():
        train = phase == "train"
        loaders[phase] = DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=train,
            generator=torch.Generator().manual_seed(seed) if train else None,
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
    """

    def __init__(self, folder: CheckedImageFolder, resize: int):
        self.samples, self.targets, self.classes = folder.samples, folder.targets, folder.classes
        self.transform, self.root, self.skipped = folder.transform, folder.root, folder.skipped
        shrink = v2.Resize(resize, antialias=True)
        self.images = [shrink(v2.functional.pil_to_tensor(load_rgb(path))) for path, _ in folder.samples]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.targets[i]


def decoded_images(folder: CheckedImageFolder, resize: int, limit_gb: float, log=print):
    """`DecodedImages(folder)` if its tensors fit in `limit_gb`, else `folder` unchanged."""
    needed = 0
    for path, _ in folder.samples:
        with Image.open(path) as img:  # the header gives the size without decoding
            w, h = img.size
        needed += 3 * resize * round(resize * max(w, h) / min(w, h))
    if needed > limit_gb * 2**30:
        log(f"image cache for {folder.root} would need {needed / 2**30:.2f} GB > {limit_gb} GB: decoding per epoch")
        return folder
    return DecodedImages(folder, resize)


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


def prepare_dogs_vs_cats(src: str | os.PathLike, dest: str | os.PathLike, *, force: bool = False,
                         log=print) -> dict:
    """Split Kaggle's flat `train/` folder (`cat.123.jpg`, `dog.45.jpg`) into
    `dest/{train,val,test}/{cat,dog}/`, as document 000 does.

    Per class, files are ordered by the index in their name; the first 64% go to train, the
    next 18% to val, the rest to test (8,000 / 2,250 / 2,250 per class on the full 25,000),
    so the same input always gives the same split. Files are hard-linked where the file
    system allows (no second copy on disk), else symlinked, else copied. Names that do not
    match `cat.N.jpg` / `dog.N.jpg` are reported and left out. A non-empty `dest` is refused
    unless `force`, which first removes its train/val/test folders.
    """
    src, dest = Path(src), Path(dest)
    if not src.is_dir():
        raise TLError(f"--src {src} is not a folder (expected Kaggle's dogs-vs-cats train/ with cat.N.jpg files)")
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
    if dest.exists() and any(dest.iterdir()):
        if not force:
            raise TLError(f"{dest} is not empty; choose another --dest or pass --force to replace its splits")
        for phase, _ in SPLIT_FRACTIONS:
            shutil.rmtree(dest / phase, ignore_errors=True)
    counts: dict[str, dict[str, int]] = {}
    methods: Counter = Counter()
    for name, files in by_class.items():
        files.sort()  # by index: cat.2 before cat.10
        n = len(files)
        n_train, n_val = round(n * SPLIT_FRACTIONS[0][1]), round(n * SPLIT_FRACTIONS[1][1])
        bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}
        for phase, (lo, hi) in bounds.items():
            folder = dest / phase / name
            folder.mkdir(parents=True, exist_ok=True)
            for _, path in files[lo:hi]:
                methods[_link_or_copy(path, folder / path.name)] += 1
            counts.setdefault(phase, {})[name] = hi - lo
    log(f"prepared {dest}: " + "; ".join(f"{p} " + ", ".join(f"{c} {k}" for c, k in v.items())
                                         for p, v in counts.items()))
    log("files " + ", ".join(f"{how} {k}" for how, k in methods.items()))
    if ignored:
        log(f"left out {len(ignored)} file(s) not named cat.N.jpg / dog.N.jpg: {', '.join(ignored[:5])}"
            + (" ..." if len(ignored) > 5 else ""))
    return {"counts": counts, "methods": dict(methods), "ignored": ignored}


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
                   seed: int = 0, verify: bool = False) -> dict[str, CheckedImageFolder]:
    """`--val-split 0.2`: train/val from a folder of class folders with no split of its own.

    Per class, a seeded shuffle sends `val_fraction` of the files to val, the rest to train
    (nothing is copied: both data sets read the same files)."""
    root = Path(root)
    if not 0 < val_fraction < 1:
        raise TLError(f"--val-split must be between 0 and 1, got {val_fraction}")
    if not root.is_dir() or not _class_dirs(root):
        raise TLError(f"--val-split needs a folder of class folders; {root} has none")
    scanned = CheckedImageFolder(root, transforms["train"], verify=verify)  # one scan of the headers
    rng = random.Random(seed)
    keep: dict[str, list] = {"train": [], "val": []}
    for target in range(len(scanned.classes)):
        items = [s for s in scanned.samples if s[1] == target]
        rng.shuffle(items)
        n_val = max(1, round(len(items) * val_fraction))
        keep["val"] += sorted(items[:n_val])
        keep["train"] += sorted(items[n_val:])
    sets = {"train": scanned, "val": copy.copy(scanned)}  # same files, own transform and sample list
    sets["val"].transform, sets["val"].skipped = transforms["val"], []  # the skip report is shown once
    for phase, ds in sets.items():
        _keep_samples(ds, keep[phase])
    return sets


# Truncated JPEGs make PIL raise mid-decode; CheckedImageFolder handles that per file, so
# we keep PIL strict (never silently pad a half image with grey).
ImageFile.LOAD_TRUNCATED_IMAGES = False
