"""Where the data lives: `--data`, `$TL_DATA_DIR`, the hymenoptera download, and
`--prepare dogs-vs-cats` (Kaggle's flat folder split into train/val/test)."""

from __future__ import annotations

import os
import re
import shutil
from collections import Counter
from pathlib import Path

from tl import TLError
from tl.engine import folders
from tl.engine.class_names import one_line
from tl.engine.images import PREPARED_MARK

DEFAULT_DATA_DIR = Path("data/hymenoptera_data")


HYMENOPTERA_URL = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"


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
    made = next((p for p in reversed([dest, *dest.parents]) if not p.exists()), None)
    created = [made] if made else []  # folders made here for --dest go too when the split fails
    try:
        counts, methods = _write_splits(by_class, dest, created)
    except BaseException:
        for folder in reversed(created):  # a half-written split is worse than none
            shutil.rmtree(folder, ignore_errors=True)
        raise
    log(f"prepared {dest}: " + "; ".join(f"{p} " + ", ".join(f"{c} {k}" for c, k in v.items())
                                         for p, v in counts.items()))
    log("files " + ", ".join(f"{how} {k}" for how, k in methods.items()))
    if ignored:
        log(f"left out {len(ignored)} file(s) not named cat.N.jpg / dog.N.jpg: {', '.join(map(one_line, ignored[:5]))}"
            + (" ..." if len(ignored) > 5 else ""))
    return {"counts": counts, "methods": dict(methods), "ignored": ignored}


def _write_splits(by_class: dict[str, list[tuple[int, Path]]], dest: Path, created: list[Path]):
    """Fill dest/{train,val,test}/{cat,dog}/; each split folder is marked, then appended to
    `created`, before any file goes in, so a failure can remove exactly what was made."""
    from tl.engine.files import atomic_write_text

    counts: dict[str, dict[str, int]] = {}
    methods: Counter = Counter()
    for phase, _ in SPLIT_FRACTIONS:
        folders.make(dest / phase, exist_ok=False)
        created.append(dest / phase)
        atomic_write_text(dest / phase / PREPARED_MARK, "made by main.py --prepare; --force may replace this folder\n")
    for name, files in by_class.items():
        files.sort()  # by index: cat.2 before cat.10
        n = len(files)
        n_train, n_val = round(n * SPLIT_FRACTIONS[0][1]), round(n * SPLIT_FRACTIONS[1][1])
        bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}
        for phase, (lo, hi) in bounds.items():
            folder = dest / phase / name
            folders.make(folder, exist_ok=False)
            for _, path in files[lo:hi]:
                target = folder / path.name
                methods[_link_or_copy(path, target)] += 1
                if not target.is_file():  # a link that leads nowhere is not a prepared image
                    raise TLError(f"{target} does not lead to a readable file after linking it to {path}")
            counts.setdefault(phase, {})[name] = hi - lo
    return counts, methods


def _link_or_copy(src: Path, dst: Path) -> str:
    from tl.engine.files import atomic_copy

    try:
        os.link(src, dst)  # same file, second name: no extra disk space
        return "hard-linked"
    except OSError:
        pass
    try:
        dst.symlink_to(src.resolve())
        return "symlinked"
    except OSError:
        atomic_copy(src, dst)  # a disk that fills up leaves no cut-off photo (and the splits made are removed)
        shutil.copystat(src, dst)  # its times, as a link would show them
        return "copied"
