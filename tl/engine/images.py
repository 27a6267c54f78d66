"""Image-file hygiene: which files in a data folder are usable images, decided once.

Real folders hold more than photos: hidden and system folders, placeholders, links,
truncated downloads, decompression bombs, 16-bit and CMYK files. `CheckedImageFolder`
scans a split folder once, keeps what is a complete, readable image, and lists what it
left out and why; every reader of a data set (training, the caches, evaluation, the data
preview) then reads the same `samples`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps
from torchvision import datasets
from torchvision.datasets.folder import IMG_EXTENSIONS

from tl import TLError
from tl.engine.progress import progress

PHASES = ("train", "val", "test")
# torchvision's still-image extensions, and JPEG's two other names. A GIF is left out with its
# reason (`not_an_image`): hymenoptera's `train/ants/imageNotFound.gif` is a placeholder, not an ant.
IMAGE_EXTENSIONS = IMG_EXTENSIONS + (".jfif", ".jpe")
PREPARED_MARK = ".made-by-tl-prepare"  # written into each split folder that --prepare creates


# ----------------------------------------------------------------------------- transforms


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


def not_an_image(path: str | os.PathLike) -> str | None:
    """Why a file in a data folder is not a photo this project trains on, or None: THE rule for
    training, evaluation and folder prediction alike (a file named on the command line may be
    any still image PIL reads). Every file it leaves out is reported with this reason."""
    name = os.path.basename(path)
    extension = os.path.splitext(name)[1].lower()
    if name.startswith("."):
        return "hidden file"
    if extension in IMAGE_EXTENSIONS:
        return None
    if extension == ".gif":
        # GIFs are animations, drawings and placeholders (hymenoptera's imageNotFound.gif), rarely photos
        return "a GIF (animations, graphics, placeholders): convert it to PNG or JPEG to use it"
    return f"not an image file ({extension or 'no extension'}; images are {', '.join(IMAGE_EXTENSIONS)})"


def has_image_extension(path: str | os.PathLike) -> bool:
    """True for a file `not_an_image` accepts (its contents are checked later)."""
    return not_an_image(path) is None


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


# What `load_rgb` does to a file's pixels, for the keys of caches built from them (feature_store.cache_key)
READER = "rgb, exif orientation applied"


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open any still image as 8-bit RGB, upright, with the header guards of `_open` (UnusableImage).

    Upright: a phone stores a portrait photo as landscape pixels plus an EXIF tag saying "turn
    me" (Orientation); every viewer obeys it, so must we, or a cat lies on its side in training
    and stands in the viewer. A tag that cannot be read leaves the pixels as stored."""
    with _open(path) as img:
        img.load()  # the full decode: a truncated file raises OSError here
        try:
            ImageOps.exif_transpose(img, in_place=True)
        except Exception:  # noqa: BLE001 - a damaged EXIF block: the pixels as stored
            pass
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
    non-system sub-folders, sorted. THE rule for "which folders are classes".

    A class name is written into config.json, the tables and the export description, all
    UTF-8 text: a folder name that is not valid UTF-8 (bytes such as b'\\xff', which Python
    holds as a surrogate escape) could not be read back as the same name, so it is refused."""
    classes, ignored = [], []
    with os.scandir(phase_dir) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if not entry.is_dir():  # (is_dir follows a symlinked class folder)
                continue
            if (why := ignored_folder(entry.name)) is None:
                classes.append(_utf8_name(entry.name, phase_dir))
            else:
                ignored.append((entry.path, why))
    return classes, ignored


def _utf8_name(name: str, folder: str | os.PathLike) -> str:
    """`name` itself, when it is valid UTF-8; otherwise one TLError that names its bytes."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(folder).decode("utf-8", "backslashreplace")
        raise TLError(f"class folder {os.fsencode(name)!r} in {shown} has a name that is not valid UTF-8, "
                      f"so it cannot be written as a class name: rename it to a UTF-8 name") from None
    return name


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


def lies_in(real: str, folder: str) -> bool:
    """True when the resolved path `real` lies inside the resolved folder `folder`: THE test for
    "in the data folder" and "in this class folder". A name is compared up to a separator, so
    data2/ and data-old/ do not lie in data/, nor ants/ in ant/."""
    return real.startswith(folder.rstrip(os.sep) + os.sep)


def scan_classes(root: str, classes: list[str], verify: bool = False, within: str | None = None,
                 follow_links: bool = False) -> dict:
    """The files of each class folder under `root`: which are samples, which are not and why.

    Each real file is counted once. Identity is (device, inode), so a symlink and a hard
    link are the same file as their target. A file reached under several names belongs to
    the class folder that really contains it, the innermost one if class folders nest (a
    link inside bees/ to ../ants/ does not make ants into bees); a file that really lies in
    two classes' folders (hard links), or that two classes reach only through links, has
    no single label and is skipped.

    A file reached through a link that leaves the data folder `within` (judged with the
    folder's own links resolved) is someone else's file: a link to a system folder would add
    its pictures to a class. It is left out unless `follow_links`, and listed in `outside`
    either way; links that `--prepare` made (a split folder holding PREPARED_MARK) are its own.

    Returns samples [(path, class index)] in class then path order, skipped [(path, why)],
    duplicates [(path, the path it repeats)], ignored [(folder, why)], not_images [(path, why)]
    and outside [(path, where it leads)].
    """
    found: dict[tuple[int, int], list[tuple[int, str, bool]]] = {}
    order: list[tuple[int, str, tuple[int, int]]] = []
    skipped, ignored, not_images, outside = [], [], [], []
    tops = [os.path.realpath(os.path.join(root, name)) for name in classes]
    home = os.path.realpath(within if within is not None else root)
    own_links = os.path.isfile(os.path.join(root, PREPARED_MARK))
    for index, name in enumerate(classes):
        for path in walk_files(os.path.join(root, name), ignored):
            if (why := not_an_image(path)) is not None:
                not_images.append((path, why))
                continue
            if not own_links and not lies_in(real := os.path.realpath(path), home):
                outside.append((path, real))
                if not follow_links:
                    continue
            try:
                st = os.stat(path)
            except OSError as exc:  # a link to nowhere, a link loop, no permission
                skipped.append((path, f"cannot be read ({exc.strerror})"))
                continue
            identity = (st.st_dev, st.st_ino)
            inside = lies_in(os.path.realpath(path), tops[index])
            found.setdefault(identity, []).append((index, path, inside))
            order.append((index, path, identity))
    samples, duplicates = [], []
    # each file's header is read (and with `verify` the whole image decoded): seconds to minutes on a large folder
    for index, path, identity in progress(order, f"checking {root}", unit=" files"):
        places = found[identity]
        holders = {c for c, _, inside in places if inside}
        # a class folder that contains another (train/all -> train) does not own that class's files
        innermost = {c for c in holders if not any(lies_in(tops[o], tops[c]) for o in holders)}
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
    return {"samples": samples, "skipped": skipped, "duplicates": duplicates, "ignored": ignored,
            "not_images": not_images, "outside": outside}


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

    def __init__(self, root: str | os.PathLike, transform=None, *, verify: bool = False,
                 within: str | os.PathLike | None = None, follow_links: bool = False):
        self._verify, self._within, self.follow_links = verify, within, follow_links
        super().__init__(str(root), transform=transform, loader=read_image, allow_empty=True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes, self.ignored = class_folders(directory)
        return classes, {name: i for i, name in enumerate(classes)}

    def make_dataset(self, directory: str, class_to_idx: dict[str, int], *args, **kwargs) -> list[tuple[str, int]]:
        scan = scan_classes(directory, list(class_to_idx), self._verify, self._within, self.follow_links)
        self.skipped, self.duplicates = scan["skipped"], scan["duplicates"]
        self.not_images, self.outside = scan["not_images"], scan["outside"]
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
    for phase in [p for p in present if p in phases]:  # a split not asked for is not read (tuning: val, test)
        names = _class_dirs(root / phase)
        if len(names) < 2:  # a classifier of one class has nothing to tell apart (config.json needs 2 or more)
            raise TLError(f"{root / phase} has {len(names)} class folder(s){': ' + names[0] if names else ''}; "
                          f"a classifier needs 2 or more\n  {expected}")
        for name in names:
            if not any(has_image_extension(f) for f in walk_files(str(root / phase / name))):
                raise TLError(f"class folder {root / phase / name} holds no image files")
        classes[phase] = names
    first, *others = classes
    for phase in others:
        if classes[phase] != classes[first]:
            from tl.engine.class_names import how_names_differ  # names that print alike (NFC / NFD)

            raise TLError(f"class folders differ between phases: {first}={classes[first]} "
                          f"but {phase}={classes[phase]}; every phase needs the same classes"
                          + how_names_differ(classes[first], classes[phase], first, phase))
    return present


# ----------------------------------------------------------------------------- datasets & loaders


# ----------------------------------------------------------------------------- where the data lives


# ----------------------------------------------------------------------------- dogs vs cats (document 000)


# Truncated JPEGs make PIL raise mid-decode; the scan skips such files (check_image) and
# read_image names one it meets later, so we keep PIL strict (never pad half an image with grey).
ImageFile.LOAD_TRUNCATED_IMAGES = False
