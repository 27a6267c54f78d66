"""At which image sizes does a network stop seeing? Its features on real photos, size by size.

    python -m benchmarks.blind_sizes --data ../shared/data/hymenoptera_data
        # -> results/blind_sizes.csv and .md

For each backbone and size, every val photo goes through the val pipeline at that size and
the network in eval mode; the page counts the photos whose features (the input of the head)
are all zero, and the pairs of different photos with identical features. Where most photos
are all zero, a frozen run trains at chance: tl/engine/image_size.py refuses such sizes
before training. Backbones: the packaged EfficientNet-Lite0/1/2 with their ImageNet weights,
and random-init torchvision (ResNet18, VGG16) and timm networks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch

from benchmarks import command, invocation_of, write_files
from tl.data import build_transforms
from tl.engine.backbones import backbone_spec
from tl.engine.files import writable_folder
from tl.engine.image_size import head_input
from tl.engine.selection import image_datasets
from tl.engine.tables import page_code, table_text
from tl.engine.weights import build_model

NETWORKS = [("efficientnet_lite0", "imagenet"), ("efficientnet_lite1", "imagenet"),
            ("efficientnet_lite2", "imagenet"), ("resnet18", "none"), ("vgg16", "none"),
            ("timm:mobilenetv3_large_100", "none")]


def measure(model, backbone: str, weights: str, data: Path, size: int) -> dict:
    """All-zero feature vectors and identical pairs among the val photos at `size` pixels."""
    spec = backbone_spec(backbone)
    val = image_datasets(data, build_transforms(spec.mean, spec.std, size=size, augment=False))["val"]
    x = torch.stack([val[i][0] for i in range(len(val))])
    row = {"backbone": backbone, "weights": weights, "size": size, "photos": len(val)}
    try:
        f = head_input(model, spec, x)
    except RuntimeError:
        return {**row, "takes": False, "all_zero": "", "identical_pairs": ""}
    _, counts = torch.unique(f, dim=0, return_counts=True)  # photos with exactly equal features
    same = int((counts * (counts - 1) // 2).sum())
    return {**row, "takes": True, "all_zero": int((f.abs().amax(1) == 0).sum()), "identical_pairs": same}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.blind_sizes", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data/hymenoptera_data"))
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 24, 32, 40, 48, 64])
    p.add_argument("--out", type=Path, default=Path("results"))
    args = p.parse_args(argv)
    invocation = invocation_of("benchmarks.blind_sizes", argv)
    out, rows = writable_folder(args.out), []
    torch.manual_seed(0)  # the random-init networks
    for backbone, weights in NETWORKS:
        model = build_model(backbone, 2, weights)
        for size in args.sizes:
            rows.append(measure(model, backbone, weights, args.data, size))
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    lines = ["# Image sizes at which a network stops seeing", "",
             f"{page_code(invocation.strip())}: per backbone and size, the val photos whose features (the",
             "head's input) are all zero, and the pairs of photos with identical features; `-` where the",
             "network cannot take the size at all. tl/engine/image_size.py refuses these sizes.", "",
             "| backbone | weights | " + " | ".join(f"{s} px" for s in args.sizes) + " |",
             "|---|---|" + "---|" * len(args.sizes)]
    for (backbone, weights), group in table.groupby(["backbone", "weights"], sort=False):
        cells = [f"{r.all_zero}/{r.photos} zero, {r.identical_pairs} pairs" if r.takes else "-"
                 for r in group.itertuples()]
        lines.append(f"| {backbone} | {weights} | " + " | ".join(cells) + " |")
    write_files({out / "blind_sizes.csv": table_text(table), out / "blind_sizes.md": "\n".join(lines) + "\n"})
    print(f"wrote {out}/blind_sizes.csv and .md")
    return 0


if __name__ == "__main__":
    sys.exit(command(main))
