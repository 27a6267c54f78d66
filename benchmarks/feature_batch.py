"""Which batch size makes the one-time feature pass fastest? Measured on the real hymenoptera photos.

    python -m benchmarks.feature_batch --data ../shared/data/hymenoptera_data [--repeats 3]
        # -> results/benchmark_feature_batch.csv and .md

The frozen recipes compute the body's output once (`tl.engine.feature_store.compute_features`)
and train the head on it. This times that pass, exactly as a run calls it (the run's layout,
`--workers 0`, JPEG decoding included), over train/ with the val transform, for each batch
size: images/s, the median of `--repeats` passes (and the min and max). Its figures are why
`feature_batch_size` picks 8 on a CPU. Timings are measurements, never test thresholds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks import at_least, command, invocation_of, spread, write_files
from tl.engine.files import writable_folder
from tl.engine.tables import page_code, table_text


def feature_pass_case(backbone: str, weights: str, data: Path) -> tuple:
    """(model, cut, train/ with the val transform): what a run's feature pass reads, built once."""
    from tl.data import build_transforms
    from tl.engine.selection import image_datasets
    from tl.engine.weights import build_model
    from tl.models import get_backbone

    spec = get_backbone(backbone)
    train = image_datasets(data, build_transforms(spec.mean, spec.std, size=spec.image_size, augment=False))["train"]
    return build_model(backbone, 2, weights), spec.cache_cut, train


def images_per_second(model, cut: str, train, batch_size: int, channels_last: bool) -> float:
    """Images/s of one feature pass over train/, as a run's `compute_features` makes it."""
    from tl.engine.feature_store import FeaturePass, compute_features

    started = time.perf_counter()
    compute_features(model, cut, train, FeaturePass(batch_size=batch_size, channels_last=channels_last))
    return len(train) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    from experiments.common import git_commit, machine_description

    p = argparse.ArgumentParser(prog="python -m benchmarks.feature_batch", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data/hymenoptera_data"))
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", default="imagenet", help="imagenet | none | PATH (the speed hardly depends on them)")
    p.add_argument("--batch-sizes", type=at_least(1), nargs="+", default=[4, 8, 16, 32, 64])
    p.add_argument("--repeats", type=at_least(1), default=3)
    p.add_argument("--layout", choices=["channels_last", "contiguous"], default="channels_last",
                   help="the run's default on this CPU is channels_last")
    p.add_argument("--out", type=Path, default=Path("results"))
    args = p.parse_args(argv)
    out, commit, rows = writable_folder(args.out), git_commit(), []
    case = feature_pass_case(args.backbone, args.weights, args.data)
    images_per_second(*case, 8, args.layout == "channels_last")  # warm-up: the files in the page cache
    for batch_size in args.batch_sizes:
        s = spread([images_per_second(*case, batch_size, args.layout == "channels_last")
                    for _ in range(args.repeats)])
        rows.append({"backbone": args.backbone, "layout": args.layout, "batch_size": batch_size,
                     "img_s_median": round(s["median"], 1), "img_s_min": round(s["min"], 1),
                     "img_s_max": round(s["max"], 1), "repeats": s["n"]})
        print(f"batch {batch_size:>3}: {s['median']:6.1f} img/s (min {s['min']:.1f}, max {s['max']:.1f})", flush=True)
    invocation = invocation_of("benchmarks.feature_batch", argv)
    lines = ["# The feature pass's batch size", "",
             f"{page_code(invocation.strip())} at commit {commit}, {time.strftime('%Y-%m-%d %H:%M')}, on "
             f"{machine_description()}: images/s of the one-time feature pass over "
             f"train/ (JPEG decoding included, --workers 0), median of {args.repeats} passes.", "",
             "| backbone | layout | batch | img/s (median) | min | max |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['backbone']} | {r['layout']} | {r['batch_size']} | {r['img_s_median']} | {r['img_s_min']} | "
              f"{r['img_s_max']} |" for r in rows]
    write_files({out / "benchmark_feature_batch.csv": table_text(rows),
                 out / "benchmark_feature_batch.md": "\n".join(lines) + "\n"})
    print(f"wrote {out}/benchmark_feature_batch.csv and .md")
    return 0


if __name__ == "__main__":
    sys.exit(command(main))
