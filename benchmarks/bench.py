"""How fast is the loop, and what do the caches buy? Measured on the real hymenoptera photos.

    python -m benchmarks.bench --data ../shared/data/hymenoptera_data [--repeats 3] [--device cpu]

For each case it reports the median of `--repeats` measurements (and the min and max):

* loop        training images/s of `tl.loop.train_model` in a real run (JPEG decoding,
              augmentation, DataLoader workers, forward, backward, step), and the same with
              `--image-cache --workers 0` (images decoded once before training; crops and flips
              per epoch in the main process) and, on a GPU, `--device-images` (the decoded
              images on the GPU, cropped, flipped and normalised there);
* bound       the same loop on ready tensors: every training image decoded and transformed
              once beforehand and held in memory, so only forward + backward + step remain.
              loop / bound is the share of the compute bound the data pipeline lets us reach.
              The bound is also taken with channels_last off, the evidence for its default;
* frozen      end-to-end seconds of `resnet_frozen` for N training epochs with the
              feature cache off, on with an empty cache (the feature pass is part of the
              cost), and on with the features already stored (a second run: another seed,
              more epochs), the cost of an epoch after the first, the val accuracy of each,
              and the speed-ups;
* memory      a hymenoptera run with both caches on: the main process's exact peak RSS, the
              peak of the whole process tree's PSS (shared pages counted once) sampled every
              50 ms, and a bound that cannot be exceeded: main peak + workers x largest worker peak.

Nothing here trains a model in its own loop: every figure comes from `tl.loop.train_model`
(directly, or through `tl.engine.run.run`). Results go to `results/benchmark.csv` and
`results/benchmark.md`. Timings are measurements, never test thresholds.
"""

from __future__ import annotations

import argparse
import dataclasses
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

from benchmarks.growth import MARK_END, MARK_START
from experiments import get_experiment
from experiments.compare_all import git_commit, machine_description
from tl.data import build_transforms
from tl.engine.device import resolve_device
from tl.engine.options import RunOptions, resolve
from tl.engine.run import run
from tl.engine.selection import ImageChoice, select_images
from tl.engine.timm_backbones import backbone_spec
from tl.engine.weights import build_model
from tl.loop import Hooks, seed_everything, train_model
from tl.recipe import make_criterion

LOOP_CASES = [  # (recipe, backbone, weights): weights do not change speed, so random ResNet18 stands in
    ("resnet_finetune", "efficientnet_lite0", "imagenet"),
    ("resnet_finetune", "resnet18", "none"),
    ("resnet_bn_only", "efficientnet_lite0", "imagenet"),
    ("vgg_finetune", "efficientnet_lite0", "imagenet"),
]


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def loop_throughput(name, backbone, weights, data, device, workers, epochs=1, image_cache=False,
                    device_images=False) -> float:
    """Training images/s of the train phase of a real run (history row)."""
    module = get_experiment(name)
    with tempfile.TemporaryDirectory() as tmp:
        opts = RunOptions(data=data, backbone=backbone, weights=weights, epochs=epochs, workers=workers,
                          device=device, out=Path(tmp), progress=False, image_cache=image_cache,
                          device_images=device_images, plots=False)
        result = run(module.RECIPE, module.build, opts, log=lambda s: None)
    return [r for r in result.history.rows if r["phase"] == "train"][-1]["images_per_s"]


def compute_bound(name, backbone, weights, data, device, channels_last=True, epochs=1) -> float:
    """The loop's training images/s on tensors already in memory (no decoding, no augmentation)."""
    module = get_experiment(name)
    recipe = resolve(module.RECIPE, RunOptions(data=data, backbone=backbone, weights=weights))
    spec = backbone_spec(recipe.backbone)
    transforms = build_transforms(spec.mean, spec.std, size=spec.image_size, augment=False)
    sets = select_images(ImageChoice(Path(data)), transforms, phases=("train", "val"))
    xs, ys = zip(*(sets["train"][i] for i in range(len(sets["train"]))))
    ready = TensorDataset(torch.stack(xs), torch.tensor(ys))
    seed_everything(0)
    model, optimizer = module.build(build_model(recipe.backbone, 2, weights), spec, recipe)
    loaders = {"train": DataLoader(ready, batch_size=recipe.batch_size, shuffle=True),
               "val": DataLoader(TensorDataset(ready.tensors[0][:1], ready.tensors[1][:1]))}
    history = train_model(model, loaders, make_criterion(recipe), optimizer, num_epochs=epochs + 1, device=device,
                          hooks=Hooks(frozen_bn_eval=recipe.frozen_bn_eval, channels_last=channels_last,
                                      progress=False, log=lambda s: None))
    return [r for r in history.rows if r["phase"] == "train"][-1]["images_per_s"]  # the last (warmest) epoch


def frozen_end_to_end(data, device, workers, epochs, cache: bool, warm: bool = False) -> dict:
    """One `resnet_frozen` run, timed from start to the last plot. The cache folder starts
    empty (building the cache is part of the cost) unless `warm`, where an untimed run of
    the same recipe has stored the features first."""
    module = get_experiment("resnet_frozen")
    with tempfile.TemporaryDirectory() as tmp:
        opts = RunOptions(data=data, backbone="efficientnet_lite0", epochs=epochs, workers=workers, device=device,
                          out=Path(tmp), progress=False, augment=False, feature_cache=cache)
        os.environ["TL_CACHE_DIR"] = str(Path(tmp) / "cache")
        if warm:
            run(module.RECIPE, module.build, dataclasses.replace(opts, run_name="fill", plots=False),
                log=lambda s: None)
        started = time.perf_counter()
        result = run(module.RECIPE, module.build, opts, log=lambda s: None)
        seconds = time.perf_counter() - started
    rows = result.history.rows
    later = [r["seconds"] for r in rows if r["epoch"] >= 2]  # epochs after the first training epoch
    return {"seconds": seconds, "later_epoch_s": sum(later) / (epochs - 1), "best_val_acc": result.history.best_acc,
            "final_val_acc": result.history.val()[-1]["acc"], "mode": result.config["feature_cache"]}


def _children(pid: int) -> list[int]:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return []
    kids = []
    for task in tasks:
        try:
            kids += [int(k) for k in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return kids + [g for k in kids for g in _children(k)]


def _pss_kib(pid: int) -> int:
    """The process's proportional set size (kB, from /proc/<pid>/smaps_rollup), 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def peak_memory(data, workers) -> dict:
    """Memory of a frozen hymenoptera run with both caches on (feature cache with 2 augmented
    views, image cache), in a child process that starts from an empty feature cache.

    RSS counts a page once per process that maps it, so adding the RSS of forked workers
    counts the pages they share with the main process twice or more; PSS divides each shared
    page among its sharers, so the PSS of all processes adds up to what the run occupies.
    Returns MiB: the main process's peak RSS (exact), the sampled peak of the tree's summed
    PSS, and an upper bound, main peak + workers x the largest worker peak."""
    code = (
        "import resource, sys, main; "
        f"code = main.main(['-e', 'resnet_frozen', '-b', 'efficientnet_lite0', '--data', {str(data)!r}, "
        f"'--epochs', '3', '--workers', '{workers}', '--image-cache', '--cache-views', '2', '--no-progress', "
        "'--out', sys.argv[1]]); "
        "hwm = next(int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM')); "
        "print('PEAK', hwm, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    # VmHWM, not getrusage(RUSAGE_SELF): Linux carries ru_maxrss across exec, so a child started
    # by this (large) benchmark process would report the benchmark's own peak as its own
    peak_pss = 0
    with tempfile.TemporaryDirectory() as tmp:
        child = subprocess.Popen([sys.executable, "-c", code, tmp], stdout=subprocess.PIPE, text=True,
                                 env={**os.environ, "TL_CACHE_DIR": str(Path(tmp) / "cache")})
        while child.poll() is None:
            tree = [child.pid, *_children(child.pid)]
            peak_pss = max(peak_pss, sum(_pss_kib(p) for p in tree))
            time.sleep(0.05)
        out, _ = child.communicate()
    if child.returncode:
        raise RuntimeError(f"the memory run failed with exit code {child.returncode}")
    main_kib, worker_kib = map(int, next(line for line in out.splitlines() if line.startswith("PEAK")).split()[1:])
    return {"main_rss": main_kib / 1024, "tree_pss": peak_pss / 1024,
            "bound": (main_kib + workers * worker_kib) / 1024}


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

    def repeat(fn, case, **kw):
        return [fn(*case, data, device, epochs=args.loop_epochs, **kw) for _ in range(args.repeats)]

    for spec in LOOP_CASES[: args.cases]:
        case = f"{spec[0]} / {spec[1]}"
        loop = repeat(loop_throughput, spec, workers=args.workers)
        # decoded once, the rest (a crop and a flip of a uint8 tensor) is cheaper in the main
        # process than in workers that compete with the compute threads for 2 cores
        cached = repeat(loop_throughput, spec, workers=0, image_cache=True)
        bound = repeat(compute_bound, spec)
        record("loop", case, "img/s", loop, workers=args.workers)
        record("loop", case + ", --image-cache --workers 0", "img/s", cached, workers=0)
        record("bound", case, "img/s", bound)
        record("share", case, "%", [100 * statistics.median(loop) / statistics.median(bound)])
        record("share", case + ", --image-cache --workers 0", "%",
               [100 * statistics.median(cached) / statistics.median(bound)])
        if device != "cpu":  # on the CPU, --device-images is --image-cache --workers 0 with batched crops
            on_device = repeat(loop_throughput, spec, workers=0, device_images=True)
            record("loop", case + ", --device-images", "img/s", on_device, workers=0)
            record("share", case + ", --device-images", "%",
                   [100 * statistics.median(on_device) / statistics.median(bound)])
        record("bound", case + ", channels_last off", "img/s", repeat(compute_bound, spec, channels_last=False))

    results = {}
    for label, cache, warm in (("cache off", False, False), ("cache on, empty", True, False),
                               ("cache on, features stored", True, True)):
        runs = [frozen_end_to_end(data, device, args.workers, args.frozen_epochs, cache, warm)
                for _ in range(args.repeats)]
        results[label] = runs
        case = f"resnet_frozen / efficientnet_lite0, {args.frozen_epochs} epochs, {label}"
        record("frozen", case, "s", [r["seconds"] for r in runs], feature_cache=runs[0]["mode"],
               best_val_acc=runs[0]["best_val_acc"], final_val_acc=runs[0]["final_val_acc"])
        record("epoch", case + ", each later epoch", "s", [r["later_epoch_s"] for r in runs])
    off = statistics.median(r["seconds"] for r in results["cache off"])
    for label in ("cache on, empty", "cache on, features stored"):
        on = statistics.median(r["seconds"] for r in results[label])
        record("speedup", f"feature cache ({label}), {args.frozen_epochs}-epoch frozen run end to end", "x",
               [off / on])
    off_e = statistics.median(r["later_epoch_s"] for r in results["cache off"])
    on_e = statistics.median(r["later_epoch_s"] for r in results["cache on, empty"])
    record("share", "cached epoch after the first / uncached epoch", "%", [100 * on_e / off_e])
    if not args.skip_memory:
        memory = peak_memory(data, args.workers)
        case = "frozen lite0 run, image + feature caches on"
        record("memory", f"{case}: main process peak RSS", "MiB", [memory["main_rss"]])
        record("memory", f"{case}: peak PSS of all processes (50 ms samples)", "MiB", [memory["tree_pss"]])
        record("memory", f"{case}: bound, main + {args.workers} x largest worker peak RSS", "MiB",
               [memory["bound"]])

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
    md = args.out / f"benchmark{suffix}.md"
    old = md.read_text() if md.exists() else ""
    # benchmarks/growth.py's section (between its markers) is that script's to replace: keep it
    growth = old[old.index(MARK_START):old.index(MARK_END) + len(MARK_END)] if MARK_START in old else ""
    md.write_text("\n".join(lines) + "\n" + (f"\n{growth}\n" if growth else ""))
    if suffix:
        (args.out / "benchmark.csv").rename(args.out / f"benchmark{suffix}.csv")
    (args.out / f"benchmark{suffix}.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {args.out}/benchmark{suffix}.csv and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
