"""How fast is the loop, and what do the caches buy? Measured on the real hymenoptera photos.

    python -m benchmarks.bench --data ../shared/data/hymenoptera_data [--repeats 3] [--device cpu]

For each case it reports the median of `--repeats` measurements (and the min and max):

* loop        training images/s of `tl.loop.train_model` in a real run (JPEG decoding,
              augmentation, DataLoader workers, forward, backward, step);
* bound       the same loop on ready tensors: every training image decoded and transformed
              once beforehand and held in memory, so only forward + backward + step remain.
              loop / bound is the share of the compute bound the data pipeline lets us reach;
* frozen      end-to-end seconds of `resnet_frozen` for N training epochs with the
              feature cache off and on (augmentation off, so both are exact), the cost of
              an epoch after the first, the val accuracy of each, and the speed-up;
* memory      peak resident memory of a hymenoptera run with both caches on.

Nothing here trains a model in its own loop: every figure comes from `tl.loop.train_model`
(directly, or through `tl.recipe.run`). Results go to `results/benchmark.csv` and
`results/benchmark.md`. Timings are measurements, never test thresholds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader, TensorDataset

from experiments import get_experiment
from experiments.compare_all import git_commit, machine_description
from tl.data import build_transforms, image_datasets
from tl.loop import resolve_device, seed_everything, train_model
from tl.models import create_model, get_backbone
from tl.recipe import RunOptions, make_criterion, resolve, run

LOOP_CASES = [  # (recipe, backbone, weights): weights do not change speed, so random ResNet18 stands in
    ("resnet_finetune", "efficientnet_lite0", "imagenet"),
    ("resnet_finetune", "resnet18", "none"),
    ("resnet_bn_only", "efficientnet_lite0", "imagenet"),
    ("vgg_finetune", "efficientnet_lite0", "imagenet"),
]


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def loop_throughput(name, backbone, weights, data, device, workers, epochs=1) -> float:
    """Training images/s of the train phase of a real run (history row)."""
    module = get_experiment(name)
    with tempfile.TemporaryDirectory() as tmp:
        opts = RunOptions(data=data, backbone=backbone, weights=weights, epochs=epochs, workers=workers,
                          device=device, out=Path(tmp), progress=False)
        result = run(module.RECIPE, module.build, opts, log=lambda s: None)
    return [r for r in result.history.rows if r["phase"] == "train"][-1]["images_per_s"]


def compute_bound(name, backbone, weights, data, device, channels_last=False, epochs=1) -> float:
    """The loop's training images/s on tensors already in memory (no decoding, no augmentation)."""
    module = get_experiment(name)
    recipe = resolve(module.RECIPE, RunOptions(data=data, backbone=backbone, weights=weights))
    spec = get_backbone(recipe.backbone)
    sets = image_datasets(data, build_transforms(spec.mean, spec.std, augment=False))
    xs, ys = zip(*(sets["train"][i] for i in range(len(sets["train"]))))
    ready = TensorDataset(torch.stack(xs), torch.tensor(ys))
    seed_everything(0)
    model, optimizer = module.build(create_model(recipe.backbone, 2, weights), spec, recipe)
    loaders = {"train": DataLoader(ready, batch_size=recipe.batch_size, shuffle=True),
               "val": DataLoader(TensorDataset(ready.tensors[0][:1], ready.tensors[1][:1]))}
    history = train_model(model, loaders, make_criterion(recipe), optimizer, num_epochs=epochs + 1, device=device,
                          frozen_bn_eval=recipe.frozen_bn_eval, channels_last=channels_last, progress=False,
                          log=lambda s: None)
    return [r for r in history.rows if r["phase"] == "train"][-1]["images_per_s"]  # the last (warmest) epoch


def frozen_end_to_end(data, device, workers, epochs, cache: bool) -> dict:
    module = get_experiment("resnet_frozen")
    with tempfile.TemporaryDirectory() as tmp:
        opts = RunOptions(data=data, backbone="efficientnet_lite0", epochs=epochs, workers=workers, device=device,
                          out=Path(tmp), progress=False, augment=False, feature_cache=cache)
        os.environ["TL_CACHE_DIR"] = str(Path(tmp) / "cache")  # a cold cache: building it is part of the cost
        started = time.perf_counter()
        result = run(module.RECIPE, module.build, opts, log=lambda s: None)
        seconds = time.perf_counter() - started
    rows = result.history.rows
    later = [r["seconds"] for r in rows if r["epoch"] >= 2]  # epochs after the first training epoch
    return {"seconds": seconds, "later_epoch_s": sum(later) / (epochs - 1), "best_val_acc": result.history.best_acc,
            "final_val_acc": result.history.val()[-1]["acc"], "mode": result.config["feature_cache"]}


def peak_memory_mb(data, workers) -> float:
    """Peak RSS (MiB) of a child process running a frozen hymenoptera run with both caches on."""
    code = (
        "import resource, sys, main; "
        f"code = main.main(['-e', 'resnet_frozen', '-b', 'efficientnet_lite0', '--data', {str(data)!r}, "
        f"'--epochs', '3', '--workers', '{workers}', '--image-cache', '--cache-views', '2', '--no-progress', "
        "'--out', sys.argv[1]]); "
        "me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
        "kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss; "
        "print('PEAK', me + kids)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-c", code, tmp], capture_output=True, text=True, check=True,
                             env={**os.environ, "TL_CACHE_DIR": str(Path(tmp) / "cache")})
    kb = int(next(line for line in out.stdout.splitlines() if line.startswith("PEAK")).split()[1])
    return kb / 1024  # main process peak + largest worker peak: an upper bound of the two together


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data/hymenoptera_data")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--frozen-epochs", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--cases", type=int, default=len(LOOP_CASES), help="measure only the first N loop cases")
    p.add_argument("--loop-epochs", type=int, default=1,
                   help="training epochs per throughput run; the last is reported (use 2 on a GPU, whose "
                        "first epoch includes cuDNN autotuning)")
    args = p.parse_args(argv)
    data, device = Path(args.data), str(resolve_device(args.device))
    commit = git_commit()  # the code that runs is the code loaded now
    rows = []

    def record(kind, case, unit, values, **extra):
        s = _stats(values)
        rows.append({"kind": kind, "case": case, "unit": unit, **s, **extra})
        print(f"{kind:<8} {case:<58} {s['median']:10.2f} {unit}  (min {s['min']:.2f}, max {s['max']:.2f}, "
              f"n={s['n']})", flush=True)

    for name, backbone, weights in LOOP_CASES[: args.cases]:
        case = f"{name} / {backbone}"
        loop = [loop_throughput(name, backbone, weights, data, device, args.workers, args.loop_epochs)
                for _ in range(args.repeats)]
        bound = [compute_bound(name, backbone, weights, data, device, epochs=args.loop_epochs)
                 for _ in range(args.repeats)]
        record("loop", case, "img/s", loop, workers=args.workers)
        record("bound", case, "img/s", bound)
        record("share", case, "%", [100 * statistics.median(loop) / statistics.median(bound)])
    if device == "cpu":  # keep channels_last off on CPU unless this shows a gain
        cl = [compute_bound("resnet_finetune", "resnet18", "none", data, device, channels_last=True)
              for _ in range(args.repeats)]
        record("bound", "resnet_finetune / resnet18, channels_last", "img/s", cl)

    results = {}
    for cache in (False, True):
        runs = [frozen_end_to_end(data, device, args.workers, args.frozen_epochs, cache) for _ in range(args.repeats)]
        results[cache] = runs
        label = f"resnet_frozen / efficientnet_lite0, {args.frozen_epochs} epochs, cache {'on' if cache else 'off'}"
        record("frozen", label, "s", [r["seconds"] for r in runs], feature_cache=runs[0]["mode"],
               best_val_acc=runs[0]["best_val_acc"], final_val_acc=runs[0]["final_val_acc"])
        record("epoch", label + ", each later epoch", "s", [r["later_epoch_s"] for r in runs])
    off = statistics.median(r["seconds"] for r in results[False])
    on = statistics.median(r["seconds"] for r in results[True])
    record("speedup", f"feature cache, {args.frozen_epochs}-epoch frozen run end to end", "x", [off / on])
    off_e = statistics.median(r["later_epoch_s"] for r in results[False])
    on_e = statistics.median(r["later_epoch_s"] for r in results[True])
    record("share", "cached epoch after the first / uncached epoch", "%", [100 * on_e / off_e])
    if not args.skip_memory:
        record("memory", "peak RSS, frozen lite0 run, image + feature caches on", "MiB",
               [peak_memory_mb(data, args.workers)])

    args.out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows)
    table.to_csv(args.out / "benchmark.csv", index=False)
    command = "python -m benchmarks.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": command.strip(), "machine": machine_description(), "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M"), "device": device,
            "peak_rss_self_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    lines = ["# Benchmark (generated by benchmarks/bench.py; do not edit by hand)", "",
             f"- command: `{meta['command']}`", f"- machine: {meta['machine']}",
             f"- commit {meta['commit']}, {meta['date']}, device {device}", "",
             "| kind | case | median | unit | min | max | n |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['kind']} | {r['case']} | {r['median']:.2f} | {r['unit']} | {r['min']:.2f} | {r['max']:.2f} "
              f"| {r['n']} |" for r in rows]
    frozen = table[table.kind == "frozen"]
    lines += ["", "Frozen runs: " + "; ".join(f"{c}: mode '{m}', best val acc {a:.4f}, final {f:.4f}"
                                             for c, m, a, f in zip(frozen.case, frozen.feature_cache,
                                                                   frozen.best_val_acc, frozen.final_val_acc))]
    suffix = "" if device == "cpu" else f"_{device.split(':')[0]}"
    (args.out / f"benchmark{suffix}.md").write_text("\n".join(lines) + "\n")
    if suffix:
        (args.out / "benchmark.csv").rename(args.out / f"benchmark{suffix}.csv")
    (args.out / f"benchmark{suffix}.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {args.out}/benchmark{suffix}.csv and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
