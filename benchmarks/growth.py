"""Does the cost grow linearly with the number of images? Measured on generated data sets.

    python -m benchmarks.growth --sizes 1000 5000 25000      # -> results/benchmark_growth.csv,
                                                             #    a section of results/benchmark.md

For each size N it writes N small images (64 x 64 JPEGs, 2 colour-tinted classes with
noise, 80% train / 20% val) and measures, each case in a fresh child process so that its
peak memory is its own (VmHWM, the peak resident set):

* epoch     one training epoch of `resnet_finetune` on a random-init ResNet18 at 64 pixels,
            through `tl.engine.run.run` (decoding, augmentation, forward, backward, step): the
            train row's seconds, and the child's peak RSS (the run also makes its val
            baseline epoch, the val epoch and the headline pass);
* features  the frozen EfficientNet-Lite0 feature pass over all N images (`tl.engine.feature_store.plan_cache`,
            train and val, no augmentation, an empty cache folder): seconds, peak RSS, and
            the size of the stored cache next to `--cache-limit-gb`.

Then it fits a straight line (seconds or MiB = a + b N) through each series and reports
the slope, the intercept and the largest deviation of a point from the line: linear growth
shows as small deviations, and the slope is the cost of one more image. Timings are
measurements, never test thresholds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks import at_least, command, invocation_of
from tl.engine import folders
from tl.engine.files import updating
from tl.engine.tables import page_code

MARK_START, MARK_END = "<!-- growth:start -->", "<!-- growth:end -->"

# run in a child process: one training epoch, or the feature pass; prints one JSON line
EPOCH_CODE = """
import json, sys
from pathlib import Path
from experiments import get_experiment
from tl.engine.options import RunOptions
from tl.engine.run import run
data, out, workers = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
module = get_experiment("resnet_finetune")
opts = RunOptions(data=data, backbone="resnet18", weights="none", epochs=1, image_size=64, workers=workers,
                  out=out, feature_cache=False, plots=False, progress=False)
rows = run(module.RECIPE, module.build, opts, log=lambda s: None).history.rows
train = next(r for r in rows if r["phase"] == "train")
hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM"))
print("RESULT", json.dumps({"seconds": train["seconds"], "images": round(train["seconds"] * train["images_per_s"]),
                            "peak_mib": hwm / 1024}))
"""

FEATURE_CODE = """
import json, sys, time
from pathlib import Path
import torch
from tl.engine import feature_store
from tl.data import build_transforms
from tl.engine.selection import ImageChoice, select_images
from tl.engine.weights import build_model
from tl.engine.backbones import backbone_spec
data, workers, limit_gb = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
spec = backbone_spec("efficientnet_lite0")
model = build_model("efficientnet_lite0", 2, "imagenet")
for p in model.parameters():
    p.requires_grad = False
for p in model.get_submodule(spec.head).parameters():
    p.requires_grad = True
sets = select_images(ImageChoice(Path(data)), build_transforms(spec.mean, spec.std, size=64, augment=False),
                     phases=("train", "val"))
started = time.perf_counter()
how = feature_store.FeaturePass(seed=0, workers=workers, device=torch.device("cpu"), channels_last=True,
                                dtype=torch.float32)
plan = feature_store.plan_cache(model, spec, sets, how, frozen_bn_eval=True, augment=False, views=0,
                                limit_gb=limit_gb, log=lambda s: None)
cached, mode = plan.cached, plan.mode
seconds = time.perf_counter() - started
hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM"))
stored = sum(p.stat().st_size for p in feature_store.cache_dir().glob("*.pt"))
print("RESULT", json.dumps({"seconds": seconds, "images": sum(len(s) for s in sets.values()), "peak_mib": hwm / 1024,
                            "cache_mib": stored / 2**20, "mode": mode}))
"""


def make_images(root: Path, n: int, size: int = 64, seed: int = 0) -> Path:
    """n JPEGs in root/{train,val}/{red,blue}/: 80% train, 20% val, half of each class."""
    from PIL import Image

    from tl.engine.files import atomic_write

    rng = np.random.default_rng(seed)
    colours = {"red": (200, 40, 40), "blue": (40, 40, 200)}
    for i in range(n):
        phase = "val" if i % 5 == 4 else "train"
        name = "red" if (i // 5) % 2 == 0 else "blue"
        folder = root / phase / name
        folders.make(folder)
        pixels = np.clip(np.array(colours[name]) + rng.integers(-60, 60, size=(size, size, 3)), 0, 255)
        image = Image.fromarray(pixels.astype(np.uint8))
        atomic_write(folder / f"{i:06d}.jpg", lambda f: image.save(f, "JPEG", quality=90))  # noqa: B023 (called at once)
    return root


def _child(code: str, *args: str, env: dict | None = None) -> dict:
    import os

    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=Path(__file__).resolve().parents[1])
    if done.returncode:
        from tl import TLError

        raise TLError(f"a measurement failed (exit status {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT"))[7:])


def fit(ns: list[int], values: list[float]) -> dict:
    """values = a + b n by least squares; the largest deviation of a point from the line,
    relative to the point."""
    b, a = np.polyfit(np.array(ns, float), np.array(values, float), 1)
    worst = max(abs(v - (a + b * n)) / v for n, v in zip(ns, values)) if len(ns) > 2 else 0.0
    return {"intercept": a, "slope": b, "max_deviation_pct": 100 * worst}


def markdown(table: pd.DataFrame, fits: dict, meta: dict) -> str:
    lines = [MARK_START, "## Growth with the number of images (generated by benchmarks/growth.py)", "",
             f"- command: {page_code(meta['command'])}", f"- machine: {meta['machine']}",
             f"- commit {meta['commit']}, {meta['date']}; 64 x 64 JPEGs, 80% train / 20% val", "",
             "| images | epoch: train images | epoch s | epoch peak MiB | feature pass images | feature pass s "
             "| feature pass peak MiB | cache on disk MiB | cache limit MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(f"| {r.n} | {r.epoch_images} | {r.epoch_s:.2f} | {r.epoch_peak_mib:.0f} | {r.feature_images} "
                     f"| {r.feature_s:.2f} | {r.feature_peak_mib:.0f} | {r.cache_mib:.1f} | {r.limit_mib:.0f} |")
    lines += ["", "Straight-line fits (value = intercept + slope x images):", "",
              "| series | intercept | slope per 1,000 images | largest deviation from the line |", "|---|---|---|---|"]
    for name, f in fits.items():
        lines.append(f"| {name} | {f['intercept']:.2f} | {1000 * f['slope']:.3f} | {f['max_deviation_pct']:.1f}% |")
    lines += ["", f"Feature cache modes: {'; '.join(sorted(set(table['mode'])))}.", MARK_END]
    return "\n".join(lines) + "\n"


def merge_section(path: Path, section: str) -> None:
    """Put `section` into the markdown file at `path`: replace the previous growth section,
    or append it; everything else in the file stays as it is."""
    text = path.read_text() if path.exists() else ""
    if MARK_START in text and MARK_END in text:
        before, rest = text.split(MARK_START, 1)
        text = before + section.rstrip("\n") + rest.split(MARK_END, 1)[1]
    else:
        text = text + ("\n" if text and not text.endswith("\n\n") else "") + section
    from tl.engine.files import atomic_write_text

    atomic_write_text(path, text)


def main(argv: list[str] | None = None) -> int:
    from experiments.common import git_commit, machine_description
    from tl.engine.files import writable_folder
    from tl.engine.tables import write_table

    p = argparse.ArgumentParser(prog="python -m benchmarks.growth", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=at_least(10), nargs="+", default=[1000, 5000, 25000],
                   help="images per data set (>= 10: both classes in train and val; two sizes or more: the "
                        "straight-line fit needs two points)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: the 2-core CPU's best)")
    p.add_argument("--cache-limit-gb", type=float, default=2.0)
    p.add_argument("--out", type=Path, default=Path("results"))
    args = p.parse_args(argv)
    if len(set(args.sizes)) < 2:
        p.error("--sizes needs two different sizes or more: a straight line through one point is no measurement")
    writable_folder(args.out)  # a folder that cannot be written stops it before anything is measured
    commit, rows = git_commit(), []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            started = time.perf_counter()
            data = make_images(Path(tmp) / f"images-{n}", n)
            made = time.perf_counter() - started
            epoch = _child(EPOCH_CODE, str(data), str(Path(tmp) / f"runs-{n}"), str(args.workers))
            feats = _child(FEATURE_CODE, str(data), str(args.workers), str(args.cache_limit_gb),
                           env={"TL_CACHE_DIR": str(Path(tmp) / f"cache-{n}")})
            rows.append({"n": n, "epoch_images": epoch["images"], "epoch_s": epoch["seconds"],
                         "epoch_peak_mib": epoch["peak_mib"], "feature_images": feats["images"],
                         "feature_s": feats["seconds"], "feature_peak_mib": feats["peak_mib"],
                         "cache_mib": feats["cache_mib"], "limit_mib": args.cache_limit_gb * 1024,
                         "mode": feats["mode"]})
            print(f"{n:>7} images (made in {made:.0f} s): epoch {epoch['seconds']:.1f} s, {epoch['peak_mib']:.0f} MiB; "
                  f"feature pass {feats['seconds']:.1f} s, {feats['peak_mib']:.0f} MiB, "
                  f"cache {feats['cache_mib']:.1f} MiB", flush=True)
    table = pd.DataFrame(rows)
    ns = list(table.n)
    fits = {"epoch seconds": fit(ns, list(table.epoch_s)), "epoch peak MiB": fit(ns, list(table.epoch_peak_mib)),
            "feature pass seconds": fit(ns, list(table.feature_s)),
            "feature pass peak MiB": fit(ns, list(table.feature_peak_mib)),
            "cache on disk MiB": fit(ns, list(table.cache_mib))}
    invocation = invocation_of("benchmarks.growth", argv)
    meta = {"command": invocation.strip(), "machine": machine_description(), "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    # one process at a time (bench.py writes the rest of the same page); the table and the section together
    with updating(args.out, meta["command"]):
        write_table(args.out / "benchmark_growth.csv", table)
        merge_section(args.out / "benchmark.md", markdown(table, fits, meta))
    print(f"wrote {args.out}/benchmark_growth.csv and the growth section of {args.out}/benchmark.md")
    return 0


if __name__ == "__main__":
    sys.exit(command(main))
