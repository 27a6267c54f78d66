"""How fast is the loop, and what do the caches buy? Measured on the real hymenoptera photos.

    python -m benchmarks.bench --data ../shared/data/hymenoptera_data [--repeats 3] [--device cpu]

For each case it reports the median of `--repeats` measurements (and the min and max):

* loop        training images/s of `tl.loop.train_model` in a real run (`--configs`: "jpeg", JPEG
              decoding and augmentation in `--workers` DataLoader workers; "image-cache",
              `--image-cache --workers 0`, images decoded once before training, crops and flips
              per epoch in the main process; "device-images", `--device-images`, the decoded
              images on the device, cropped, flipped and normalised there in batches: by default
              only off the CPU), each in the device's default layout; "loop-layout": the fastest
              of those paths again in the other layout;
* bound       the same loop on ready tensors ("bound"; "bound-layout" in the other layout):
              every training image decoded and transformed once beforehand and moved to the
              device before the loop starts, read in seeded shuffled batches of the recipe's size
              that stay there, trained with the loop's own settings on that device (bf16 autocast
              and per-phase reads on CUDA, the recipe's BatchNorm modes: `bound_training`, built
              by the functions a run uses), so only forward + backward + step remain.
              loop / bound ("share", against the bound of the loop's layout) is the share of the
              compute bound the data path lets us reach;
* --compile   `--compile-case RECIPE/BACKBONE`: torch.compile against eager on one case;
* frozen      end-to-end seconds of `resnet_frozen` for N training epochs with the
              feature cache off, on with an empty cache (the feature pass is part of the
              cost), and on with the features already stored (a second run: another seed,
              more epochs), the cost of an epoch after the first, the val accuracy of each,
              and the speed-ups (`--skip-frozen` leaves them out);
* memory      a hymenoptera run with both caches on: the main process's exact peak RSS, the
              peak of the whole process tree's PSS (shared pages counted once) sampled every
              50 ms, and a bound that cannot be exceeded: main peak + workers x largest worker peak;
* end-to-end  `--compare-minutes`: `experiments.compare_all` with seed 0 in a child process
              writing to a temporary folder (never results/): its wall minutes and its runs'
              train seconds, beside the same runs' train seconds on the CPU from results/runs.csv.

Nothing here trains a model in its own loop: every figure comes from `tl.loop.train_model`
(directly, or through `tl.engine.run.run`). Results go to `results/benchmark.csv`, `.md` and
`.json` (`benchmark_cuda.*` on a GPU, whose every row and header name the card), rewritten after
each part, so a command stopped by `--deadline` or a timeout keeps what it measured.
Timings are measurements, never test thresholds. benchmarks/gpu_session.sh runs the GPU set.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmarks import at_least, child_process, command, invocation_of, spread
from benchmarks.growth import MARK_END, MARK_START
from experiments import get_experiment
from experiments.common import git_commit, machine_description
from tl import TLError
from tl.data import build_transforms
from tl.engine import folders
from tl.engine.backbones import backbone_spec
from tl.engine.device import default_channels_last, device_hooks, make_grad_scaler, prepare_device, resolve_device
from tl.engine.files import atomic_copy, atomic_write_text, updating, writable_folder
from tl.engine.options import RunOptions, resolve
from tl.engine.run import run
from tl.engine.selection import ImageChoice, select_images
from tl.engine.stage_setup import stage_hooks
from tl.engine.tables import page_code, page_text, read_table, write_table
from tl.engine.weights import build_model
from tl.loop import seed_everything, train_model
from tl.recipe import make_criterion
from tl.stages import as_stages, place

LOOP_CASES = [  # (recipe, backbone, weights): weights do not change speed, so random ResNet18 stands in
    ("resnet_finetune", "efficientnet_lite0", "imagenet"),
    ("resnet_finetune", "resnet18", "none"),
    ("resnet_bn_only", "efficientnet_lite0", "imagenet"),
    ("vgg_finetune", "efficientnet_lite0", "imagenet"),
]


def loop_throughput(name, backbone, weights, data, device, workers, epochs=1, image_cache=False,
                    device_images=False, channels_last=None, compile=False) -> float:
    """Training images/s of the train phase of a real run (history row). `channels_last=None`
    is a run's default for the device (tl.engine.device.default_channels_last)."""
    module = get_experiment(name)
    with tempfile.TemporaryDirectory() as tmp:
        opts = RunOptions(data=data, backbone=backbone, weights=weights, epochs=epochs, workers=workers,
                          device=device, out=Path(tmp), progress=False, image_cache=image_cache,
                          device_images=device_images, channels_last=channels_last, compile=compile, plots=False)
        result = run(module.RECIPE, module.build, opts, log=lambda s: None)
    return [r for r in result.history.rows if r["phase"] == "train"][-1]["images_per_s"]


@functools.lru_cache(maxsize=4)
def ready_images(data: str, backbone: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every training image decoded and transformed once (val's resize and centre crop), on the
    CPU: (images, labels). Cached: the repeats and both layouts of a bound reuse them."""
    spec = backbone_spec(backbone)
    transforms = build_transforms(spec.mean, spec.std, size=spec.image_size, augment=False)
    sets = select_images(ImageChoice(Path(data)), transforms, phases=("train", "val"))
    xs, ys = zip(*(sets["train"][i] for i in range(len(sets["train"]))))
    return torch.stack(xs), torch.tensor(ys)


class ShuffledBatches(torch.utils.data.Sampler):
    """Batches of indices in a seeded random order, each an index tensor on the device: a
    DataLoader (batch_size=None) over a TensorDataset held on the device then yields device
    tensors, one gather per batch, with no host copy and no host sync."""

    def __init__(self, n: int, batch_size: int, device: torch.device, seed: int = 0):
        self.n, self.batch_size, self.device = n, batch_size, device
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.generator).to(self.device).split(self.batch_size))

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)


def bound_training(name, backbone, weights, device: torch.device, channels_last=None):
    """What the compute bound trains, set up as a real run on `device` sets it up: the recipe
    (batch size and all), its model and first stage's optimizer (tl.stages: whatever `build`
    returns), the loss, and the loop's Hooks: the stage's BatchNorm modes (`stage_hooks`, as
    tl.engine.run.train_stages has them) with the device's precision, layout and per-phase
    reads (`device_hooks`, the same function the run calls). Returns (recipe, model,
    optimizer, criterion, hooks)."""
    module = get_experiment(name)
    opts = RunOptions(data=Path("."), backbone=backbone, weights=weights, channels_last=channels_last)
    recipe = resolve(module.RECIPE, opts)
    spec = backbone_spec(recipe.backbone)
    model = build_model(recipe.backbone, 1 if recipe.loss == "bce_logit" else 2, recipe.weights,
                        stack=recipe.stack_head)
    model, stages = as_stages(module.build(model, spec, recipe))
    span = place(stages, recipe.train_epochs)[0]
    optimizer = span.stage.setup(model, spec, recipe)
    scaler = make_grad_scaler(device, opts.amp)
    hooks = dataclasses.replace(stage_hooks(span, recipe, None),
                                **device_hooks(device, opts.amp, opts.channels_last, scaler),
                                progress=False, log=lambda s: None)
    return recipe, model, optimizer, make_criterion(recipe).to(device), hooks


def compute_bound(name, backbone, weights, data, device, channels_last=None, epochs=1) -> float:
    """The loop's training images/s on tensors already on the device (no decoding, no
    augmentation, no copy), with the loop's own settings for that device (`bound_training`):
    loop / bound then measures the data path alone. `channels_last=None`: the device's default."""
    device = torch.device(device)
    prepare_device(device)
    seed_everything(0)
    recipe, model, optimizer, criterion, hooks = bound_training(name, backbone, weights, device, channels_last)
    xs, ys = ready_images(str(data), recipe.backbone)
    xs, ys = xs.to(device), ys.to(device)  # moved before the loop starts
    loaders = {"train": DataLoader(TensorDataset(xs, ys), batch_size=None,
                                   sampler=ShuffledBatches(len(ys), recipe.batch_size, device)),
               "val": DataLoader(TensorDataset(xs[:1], ys[:1]), batch_size=None,
                                 sampler=ShuffledBatches(1, 1, device))}
    history = train_model(model, loaders, criterion, optimizer, num_epochs=epochs + 1, device=device, hooks=hooks)
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
    with tempfile.TemporaryDirectory() as tmp, child_process(
            [sys.executable, "-c", code, tmp], stdout=subprocess.PIPE, text=True,
            env={**os.environ, "TL_CACHE_DIR": str(Path(tmp) / "cache")}) as child:
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


CONFIGS = ("jpeg", "image-cache", "device-images", "bound", "bound-layout", "loop-layout")
PATHS = {  # data path -> (what the case's label adds, loop_throughput's options besides --workers)
    "jpeg": (", JPEG decoding in {workers} workers", {}),  # decoding and augmentation in DataLoader workers
    "image-cache": (", --image-cache --workers 0", {"workers": 0, "image_cache": True}),
    "device-images": (", --device-images", {"workers": 0, "device_images": True}),
}
DOCUMENT_RECIPES = ("resnet_scratch", "resnet_finetune", "resnet_frozen", "resnet_bn_only", "vgg_transfer",
                    "vgg_finetune", "vgg_stacked")
ROOT = Path(__file__).resolve().parents[1]


def case_spec(text: str) -> tuple[str, str, str]:
    """RECIPE/BACKBONE (an argparse type): its LOOP_CASES entry, else that pair with ImageNet weights."""
    name, sep, backbone = text.partition("/")
    if not sep or not name or not backbone:
        raise argparse.ArgumentTypeError(f"{text!r}: expected RECIPE/BACKBONE, e.g. resnet_finetune/efficientnet_lite0")
    return next((c for c in LOOP_CASES if c[:2] == (name, backbone)), (name, backbone, "imagenet"))


def layout(on: bool) -> str:
    return f"channels_last {'on' if on else 'off'}"


def measure_case(spec, configs, args, data, device, record) -> dict:
    """One loop case in every configuration of `configs`: the loop on each data path (the device's
    default layout), the bound in both layouts, each loop's share of the bound of its layout, and
    the fastest path again in the other layout. Returns {path: img/s of each repeat}."""
    case, default = f"{spec[0]} / {spec[1]}", default_channels_last(torch.device(device))

    def repeat(fn, **kw):
        return [fn(*spec, data, device, epochs=args.loop_epochs, **kw) for _ in range(args.repeats)]

    loops, bounds = {}, {}
    for path, (label, kw) in PATHS.items():
        if path in configs:
            kw = {"workers": args.workers, **kw}
            loops[path] = repeat(loop_throughput, **kw)
            record("loop", case + label.format(**kw), "img/s", loops[path], workers=kw["workers"])
    for on in (default, not default):
        if ("bound" if on == default else "bound-layout") in configs:
            bounds[on] = repeat(compute_bound, channels_last=on)
            record("bound", f"{case}, {layout(on)}", "img/s", bounds[on])

    def share(label, values, on):
        if on in bounds:
            record("share", label, "%", [100 * statistics.median(values) / statistics.median(bounds[on])])

    for path, values in loops.items():
        share(case + PATHS[path][0].format(workers=args.workers), values, default)
    if "loop-layout" in configs and loops:
        best = max(loops, key=lambda p: statistics.median(loops[p]))
        label, kw = PATHS[best]
        kw = {"workers": args.workers, **kw}
        label = label.format(**kw)
        other = repeat(loop_throughput, channels_last=not default, **kw)
        record("loop", f"{case}{label}, {layout(not default)}", "img/s", other, workers=kw["workers"])
        share(f"{case}{label}, {layout(not default)}", other, not default)
    return loops


def measure_compile(spec, path, measured, args, data, device, record) -> None:
    """`--compile` against eager on one case and data path: eager from this command's own rows
    where it measured them, else measured here first."""
    case = f"{spec[0]} / {spec[1]}"
    label, kw = PATHS[path]
    kw = {"workers": args.workers, **kw}
    label = label.format(**kw)
    eager = measured.get(path)
    if eager is None:
        eager = [loop_throughput(*spec, data, device, epochs=args.loop_epochs, **kw) for _ in range(args.repeats)]
        record("loop", case + label, "img/s", eager, workers=kw["workers"])
    compiled = [loop_throughput(*spec, data, device, epochs=args.loop_epochs, compile=True, **kw)
                for _ in range(args.compile_repeats or args.repeats)]
    record("loop", f"{case}{label}, --compile", "img/s", compiled, workers=kw["workers"])
    record("speedup", f"{case}{label}: --compile / eager", "x",
           [statistics.median(compiled) / statistics.median(eager)])


def committed_cpu_runs(runs: pd.DataFrame) -> tuple[float, str] | None:
    """The same runs (data set, recipe, backbone, seed, epochs) in the committed results/runs.csv,
    trained on the CPU: (their train seconds summed, that machine), or None where one is missing."""
    keys = ["dataset", "experiment", "backbone", "seed", "train_epochs"]
    try:
        committed = read_table(ROOT / "results" / "runs.csv")
        machine = json.loads((ROOT / "results" / "meta.json").read_text()).get("machine", "CPU")
    except (OSError, ValueError, TLError):
        return None
    cpu = committed[(committed.device == "cpu") & (committed.status == "ok") & (committed.quick.astype(str) != "True")]
    merged = runs[keys].merge(cpu[keys + ["train_seconds"]].drop_duplicates(keys), on=keys, how="left")
    return None if merged.train_seconds.isna().any() else (float(merged.train_seconds.sum()), machine)


def compare_end_to_end(args, data, device, record, notes, timeout: float) -> None:
    """`experiments.compare_all` with one seed, in a child process writing to a temporary folder
    (never the committed results/): its wall time, its runs' summed train seconds, and the same
    runs' train seconds on the CPU from the committed results/runs.csv."""
    from experiments.common import dataset_name

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results"
        cmd = ["--data", str(data), "--backbone", *args.compare_backbones, "--experiments", *args.compare_experiments,
               "--seeds", "0", "--device", device, "--workers", str(args.workers), "--out", str(out),
               "--runs-dir", str(Path(tmp) / "runs")] + (["--epochs", str(args.compare_epochs)]
                                                         if args.compare_epochs else [])
        shown = "python -m experiments.compare_all " + " ".join(a for i, a in enumerate(cmd) if not (
            a in ("--out", "--runs-dir") or i and cmd[i - 1] in ("--out", "--runs-dir")))  # not the temporary folders
        print(f"end-to-end: {shown}", flush=True)
        started = time.perf_counter()
        with child_process([sys.executable, "-m", "experiments.compare_all", *cmd], cwd=ROOT) as child:
            try:
                code = child.wait(timeout=max(timeout, 1.0))
            except subprocess.TimeoutExpired:  # the block's end ends it, with its workers
                notes.append(f"end-to-end: {page_code(shown)} did not finish within {max(timeout, 1.0):.0f} s; "
                             f"no figure")
                return
        minutes = (time.perf_counter() - started) / 60
        if code != 0 or not (out / "runs.csv").is_file():
            notes.append(f"end-to-end: {page_code(shown)} failed with exit code {code}; no figure")
            return
        runs = read_table(out / "runs.csv")
        if args.compare_keep:
            folders.make(args.compare_keep)
            atomic_copy(out / "runs.csv", args.compare_keep / "compare_runs.csv")
    ok = runs[runs.status == "ok"]
    what = f"compare_all {dataset_name(data)}, {len(runs)} runs ({', '.join(args.compare_backbones)}, seed 0)"
    record("end-to-end", f"{what}, wall time", "min", [minutes])
    record("end-to-end", f"{what}: train seconds of its {len(ok)} finished runs, summed", "s",
           [float(ok.train_seconds.sum())])
    if len(ok) == len(runs) and (cpu := committed_cpu_runs(ok)) is not None:
        record("end-to-end", f"{what}: the same runs' train seconds on the CPU (committed results/runs.csv, "
               f"{cpu[1]}), summed", "s", [cpu[0]], card=cpu[1])
    notes.append(f"end-to-end: {page_code(shown)}, {len(ok)} of {len(runs)} runs finished"
                 + ("" if len(ok) == len(runs) else f" (not run: {', '.join(runs[runs.status != 'ok'].run)})"))


class TimeLimit(BaseException):
    """Raised by SIGALRM inside `time_limit` (a BaseException: code that catches Exception lets it pass)."""


@contextlib.contextmanager
def time_limit(seconds: float | None, what: str, notes: list[str]):
    """Run the block for at most `seconds` (None: no limit); past it, the block stops and a note
    says so. In the main thread, as the benchmark runs (SIGALRM)."""
    if seconds is None:
        yield
        return
    fired = []

    def stop(signum, frame):
        fired.append(True)
        raise TimeLimit

    old = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    except BaseException:  # noqa: BLE001 - a library may wrap the TimeLimit in its own error
        if not fired:
            raise
        notes.append(f"{what}: stopped at the deadline, after {max(seconds, 1.0):.0f} s; no figure")
        print(f"{what}: stopped at the deadline", flush=True)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)  # the recorded command names every option in full
    p.add_argument("--data", default="../shared/data/hymenoptera_data")
    p.add_argument("--repeats", type=at_least(1), default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=at_least(0), default=2)
    p.add_argument("--frozen-epochs", type=at_least(1), default=5)
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-frozen", action="store_true", help="leave out the frozen end-to-end runs")
    p.add_argument("--cases", type=at_least(1), default=len(LOOP_CASES), help="measure only the first N loop cases")
    p.add_argument("--case", action="append", type=case_spec, metavar="RECIPE/BACKBONE",
                   help="measure this loop case (repeatable; replaces --cases), e.g. resnet_bn_only/efficientnet_lite0")
    p.add_argument("--configs", nargs="+", choices=CONFIGS, metavar="CONFIG",
                   help=f"the configurations of each loop case: {', '.join(CONFIGS)} (default: all; "
                        "device-images only off the CPU unless named)")
    p.add_argument("--loop-epochs", type=at_least(1), default=1,
                   help="training epochs per throughput run; the last is reported (use 2 on a GPU, whose "
                        "first epoch includes cuDNN autotuning)")
    p.add_argument("--compile-case", type=case_spec, metavar="RECIPE/BACKBONE",
                   help="measure --compile against eager on this case")
    p.add_argument("--compile-path", choices=tuple(PATHS),
                   help="its data path (default: the case's fastest measured, else device-images on a GPU, "
                        "image-cache on the CPU)")
    p.add_argument("--compile-repeats", type=at_least(1), help="repeats of the compiled run (default --repeats)")
    p.add_argument("--compare-minutes", action="store_true",
                   help="also time experiments.compare_all end to end with seed 0 (into a temporary folder)")
    p.add_argument("--compare-experiments", nargs="+", default=list(DOCUMENT_RECIPES), metavar="NAME")
    p.add_argument("--compare-backbones", nargs="+", default=["efficientnet_lite0"], metavar="BACKBONE",
                   help="(default efficientnet_lite0, whose weights need no download)")
    p.add_argument("--compare-epochs", type=int, help="--epochs for compare_all (default: each recipe's own)")
    p.add_argument("--compare-timeout", type=float, default=3600, help="seconds before compare_all is stopped")
    p.add_argument("--compare-keep", type=Path, metavar="DIR", help="copy compare_all's runs.csv here")
    p.add_argument("--deadline", type=float, metavar="SECONDS",
                   help="end within this many seconds of the start: --compile and the end-to-end comparison "
                        "stop there (with a note; the loop cases always run, and every part is written as it ends)")
    p.add_argument("--compare-reserve", type=float, default=0, metavar="SECONDS",
                   help="with --deadline and --compare-minutes: seconds the --compile step leaves for the comparison")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    writable_folder(args.out)  # a folder that cannot be written stops it before anything is measured
    data, device = Path(args.data), str(resolve_device(args.device))
    commit = git_commit()  # the code that runs is the code loaded now
    if commit == "unknown" and os.environ.get("BENCH_COMMIT"):  # a copy without .git (the GPU machine)
        commit = f"{os.environ['BENCH_COMMIT']} (from BENCH_COMMIT: this copy has no .git)"
    card = machine_description() if device == "cpu" else torch.cuda.get_device_name(torch.device(device))
    configs = args.configs or [c for c in CONFIGS if c != "device-images" or device != "cpu"]
    invocation = invocation_of("benchmarks.bench", argv)
    rows, notes = [], []

    def record(kind, case, unit, values, **extra):
        s = spread(values)
        rows.append({"kind": kind, "case": case, "unit": unit, **s, "card": card, **extra})
        print(f"{kind:<8} {case:<58} {s['median']:10.2f} {unit}  (min {s['min']:.2f}, max {s['max']:.2f}, "
              f"n={s['n']})", flush=True)

    def save(done: str) -> None:  # after every part: a run stopped by a timeout keeps what it measured
        # one process at a time (growth.py writes a section of the same page), all its files or none
        with updating(args.out, invocation.strip()):
            write_results(args.out, rows, notes, {"command": invocation.strip(), "machine": machine_description(),
                                                  "card": card, "commit": commit, "device": device,
                                                  "date": time.strftime("%Y-%m-%d %H:%M"), "complete": done == "all",
                                                  "written_after": done})

    started = time.monotonic()

    def left(reserve: float = 0) -> float | None:  # seconds to the deadline, less a reserve (None: no deadline)
        return None if args.deadline is None else args.deadline - (time.monotonic() - started) - reserve

    measured = {}
    for spec in args.case or LOOP_CASES[: args.cases]:
        measured[spec] = measure_case(spec, configs, args, data, device, record)
        save(f"{spec[0]} / {spec[1]}")
    if args.compile_case:
        spec, loops = args.compile_case, measured.get(args.compile_case, {})
        path = args.compile_path or (max(loops, key=lambda p: statistics.median(loops[p])) if loops
                                     else "image-cache" if device == "cpu" else "device-images")
        with time_limit(left(args.compare_reserve if args.compare_minutes else 0), "--compile", notes):
            measure_compile(spec, path, loops, args, data, device, record)
        save("--compile")
    if not args.skip_frozen:
        frozen_section(args, data, device, record)
        save("frozen")
    if not args.skip_memory:
        memory = peak_memory(data, args.workers)
        case = "frozen lite0 run, image + feature caches on"
        record("memory", f"{case}: main process peak RSS", "MiB", [memory["main_rss"]])
        record("memory", f"{case}: peak PSS of all processes (50 ms samples)", "MiB", [memory["tree_pss"]])
        record("memory", f"{case}: bound, main + {args.workers} x largest worker peak RSS", "MiB",
               [memory["bound"]])
    if args.compare_minutes:  # last: it times a whole comparison, not one loop
        save("memory")
        limit = min(args.compare_timeout, math.inf if left() is None else left())
        compare_end_to_end(args, data, device, record, notes, timeout=limit)
    save("all")
    return 0


def frozen_section(args, data, device, record) -> None:
    """`resnet_frozen` end to end with the feature cache off, on and empty, on and filled."""
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


def write_results(out: Path, rows: list[dict], notes: list[str], meta: dict) -> None:
    """results/benchmark[_cuda].md, .csv and .json: every row, the command, the machine and card."""
    device = meta["device"]
    folders.make(out)
    suffix = "" if device == "cpu" else f"_{device.split(':')[0]}"
    table = pd.DataFrame(rows)
    write_table(out / f"benchmark{suffix}.csv", table)
    meta = {**meta, "peak_rss_self_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "notes": notes}
    where = f"device {device}" + ("" if device == "cpu" else f": {meta['card']} (every figure below was measured "
                                                               f"on this card, in this one command)")
    layout_default = layout(default_channels_last(torch.device(device.split(":")[0])))
    lines = ["# Benchmark (generated by benchmarks/bench.py; do not edit by hand)", "",
             f"- command: {page_code(meta['command'])}", f"- machine: {meta['machine']}",
             f"- commit {meta['commit']}, {meta['date']}, {where}",
             f"- loop rows that name no layout use the device's default ({layout_default}); a share divides a "
             "loop by the bound of the same layout; the bound trains on tensors already on the device with the "
             "loop's own precision, layout and per-phase reads",
             *([] if meta["complete"] else [f"- **partial**: the command stopped after {meta['written_after']}"]),
             *(f"- {n}" for n in notes), "",
             "| kind | case | median | unit | min | max | n |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['kind']} | {page_text(r['case'])} | {r['median']:.2f} | {r['unit']} | {r['min']:.2f} "
              f"| {r['max']:.2f} | {r['n']} |" for r in rows]
    frozen = table[table.kind == "frozen"] if len(table) else table
    if len(frozen):
        lines += ["", "Frozen runs: " + "; ".join(f"{c}: mode '{m}', best val acc {a:.4f}, final {f:.4f}"
                                                 for c, m, a, f in zip(frozen.case, frozen.feature_cache,
                                                                       frozen.best_val_acc, frozen.final_val_acc))]
    md = out / f"benchmark{suffix}.md"
    old = md.read_text() if md.exists() else ""
    # benchmarks/growth.py's section (between its markers) is that script's to replace: keep it
    growth = old[old.index(MARK_START):old.index(MARK_END) + len(MARK_END)] if MARK_START in old else ""
    atomic_write_text(md, "\n".join(lines) + "\n" + (f"\n{growth}\n" if growth else ""))
    atomic_write_text(out / f"benchmark{suffix}.json", json.dumps(meta, indent=2) + "\n")
    print(f"wrote {out}/benchmark{suffix}.csv, .md and .json", flush=True)


if __name__ == "__main__":
    sys.exit(command(main))
