"""What does transfer learning buy? Every recipe, same data, same loop, side by side.

    python -m experiments.compare_all --data ../shared/data/hymenoptera_data \\
        --backbone efficientnet_lite0 own --seeds 0 1 2

runs each recipe x backbone x seed through `tl.recipe.run` (the one loop) and writes to
`--out` (default `results/`):

    runs.csv              one row per run (seed): the raw figures
    summary.csv           one row per recipe x backbone: mean ± std over seeds (pandas)
    history/<run>.csv     every run's per-epoch rows, so any figure can be recomputed
    curves.png            val accuracy and loss per epoch, one line per recipe
    comparison.png        best val accuracy next to training time
    curves_<exp>.png      train vs val curves of each recipe
    meta.json, README.md  the command, the machine, and the table in words (experiments/report.py)

`--backbone own` means each recipe's own architecture (ResNet18, VGG16). A run that
cannot start here, e.g. because ImageNet weights for a torchvision backbone are not on
this machine, becomes a `not run` row with the reason; the others go on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from experiments import NAMES, get_experiment
from experiments.report import write_report
from tl import TLError, plots
from tl.data import resolve_data_dir
from tl.recipe import RunOptions, resolve, run

RUN_COLUMNS = [
    "experiment", "source", "backbone", "weights", "strategy", "seed", "status", "reason",
    "trainable_params", "total_params", "train_epochs", "batch_size", "optimizer", "learning_rates",
    "baseline_val_acc", "best_val_acc", "best_epoch", "final_val_acc", "final_val_loss",
    "train_seconds", "train_images_per_s", "feature_cache", "device", "torch", "date", "run",
]
MEAN_STD = ["best_val_acc", "final_val_acc"]  # reported as mean and std over seeds
MEAN_ONLY = ["baseline_val_acc", "best_epoch", "train_seconds", "train_images_per_s"]
CONSTANT = ["source", "weights", "strategy", "trainable_params", "total_params", "train_epochs",
            "batch_size", "optimizer", "learning_rates", "feature_cache", "device", "torch"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.compare_all", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="data folder (default: $TL_DATA_DIR or data/hymenoptera_data)")
    p.add_argument("--backbone", nargs="+", default=["own"],
                   help="backbone(s) for every recipe; 'own' = each recipe's default (default: own)")
    p.add_argument("--experiments", nargs="+", default=list(NAMES), metavar="NAME", help="a subset of recipes")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="repeat each run with these seeds")
    p.add_argument("--epochs", type=int, help="training epochs for every recipe (default: each recipe's own)")
    p.add_argument("--out", type=Path, default=None,
                   help="where the tables and plots go (default results/; with --quick, runs/quick-results/, "
                        "so a smoke run never overwrites the committed results)")
    p.add_argument("--runs-dir", type=Path, default=None, help="run folders (default runs/compare-<time>)")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 8 images per class, 1 training epoch, 64-pixel images")
    args = p.parse_args(argv)
    for name in args.experiments:
        if name not in NAMES:
            p.error(f"unknown experiment {name!r}; choose from {', '.join(NAMES)}")
    if args.epochs is not None and args.epochs < 1:
        p.error("--epochs must be at least 1")
    return args


def run_one(name: str, backbone: str, seed: int, args: argparse.Namespace, runs_dir: Path,
            history_dir: Path, log) -> dict:
    """One recipe x backbone x seed -> one row of runs.csv (status ok / not run / failed)."""
    module = get_experiment(name)
    opts = RunOptions(data=args.data_dir, backbone=None if backbone == "own" else backbone, epochs=args.epochs,
                      seed=seed, workers=args.workers, device=args.device, out=runs_dir, progress=False,
                      plots=False)
    if args.quick:
        opts.make_quick()
    recipe = resolve(module.RECIPE, opts)
    label = f"{name}-{recipe.backbone}-seed{seed}"
    opts.run_name = label
    row = {"experiment": name, "source": recipe.source, "backbone": recipe.backbone, "strategy": recipe.strategy,
           "seed": seed, "train_epochs": recipe.train_epochs, "batch_size": recipe.batch_size,
           "weights": recipe.weights, "learning_rates": _lrs(recipe.lrs), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "run": label}
    try:
        result = run(module.RECIPE, module.build, opts, log=lambda line: log("    " + line))
    except TLError as exc:
        return row | {"status": "not run", "reason": str(exc).splitlines()[0]}
    except Exception as exc:  # a bug in one recipe must not hide the other results
        return row | {"status": "failed", "reason": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    cfg, res = result.config, result.config["results"]
    pd.DataFrame(result.history.rows).to_csv(history_dir / f"{label}.csv", index=False)
    return row | {
        "status": "ok", "reason": "", "weights": cfg["weights_kind"], "optimizer": cfg["optimizer"],
        "learning_rates": ", ".join(f"{g['name']} {g['lr']:g}" for g in cfg["param_groups"]),
        "trainable_params": cfg["trainable_params"], "total_params": cfg["total_params"], "device": cfg["device"],
        "feature_cache": cfg.get("feature_cache", "off"),
        **{k: res[k] for k in ("baseline_val_acc", "best_val_acc", "best_epoch", "final_val_acc",
                               "final_val_loss", "train_seconds", "train_images_per_s")},
    }


def _lrs(lrs: dict) -> str:
    return ", ".join(f"{g} {lr:g}" for g, lr in lrs.items())


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per recipe x backbone: mean ± std over the seeds that ran (pandas groupby).

    std is the sample standard deviation (ddof=1), empty for a single seed."""
    rows = []
    for (experiment, backbone), g in runs.groupby(["experiment", "backbone"], sort=False):
        ok = g[g.status == "ok"]
        first = (ok if len(ok) else g).iloc[0]
        row = {"experiment": experiment, "backbone": backbone, **{c: first.get(c) for c in CONSTANT}}
        for c in MEAN_STD:
            row[f"{c}_mean"] = ok[c].mean() if len(ok) else None
            row[f"{c}_std"] = ok[c].std() if len(ok) > 1 else None
        for c in MEAN_ONLY:
            row[f"{c}_mean"] = ok[c].mean() if len(ok) else None
        row["seeds"] = len(ok)
        row["date"] = first["date"]
        row["status"] = "ok" if len(ok) == len(g) else ("not run" if (g.status == "not run").all()
                                                        else "partly failed" if len(ok) else "failed")
        row["reason"] = "" if row["status"] == "ok" else next(r for r in g.reason if r)
        rows.append(row)
    return pd.DataFrame(rows)


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{os.cpu_count()} CPU cores ({cpu}){gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_outputs(out: Path, runs: pd.DataFrame, meta: dict) -> pd.DataFrame:
    summary = summarize(runs)
    runs[RUN_COLUMNS].to_csv(out / "runs.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    histories = {}
    done = runs[runs.status == "ok"]
    for (experiment, backbone), g in done.groupby(["experiment", "backbone"], sort=False):
        frames = [pd.read_csv(out / "history" / f"{r}.csv").assign(seed=s) for r, s in zip(g.run, g.seed)]
        histories[f"{experiment} / {backbone}"] = df = pd.concat(frames)
        several = done[done.experiment == experiment].backbone.nunique() > 1
        name = f"curves_{experiment}_{backbone}.png" if several else f"curves_{experiment}.png"
        plots.run_curves(df, out / name, title=f"{experiment} on {backbone} ({len(g)} seed(s))")
    if histories:
        plots.compare_curves(histories, out / "curves.png")
        plots.comparison_chart(summary, out / "comparison.png")
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    write_report(out)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        args.data_dir = resolve_data_dir(args.data)
    except TLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out: Path = args.out or (Path("runs/quick-results") if args.quick else Path("results"))
    (out / "history").mkdir(parents=True, exist_ok=True)
    runs_dir = args.runs_dir or Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    plan = [(e, b, s) for e in args.experiments for b in args.backbone for s in args.seeds]
    commit = git_commit()  # read now: the code that runs is the code loaded at the start
    started = time.time()
    rows = []
    for i, (name, backbone, seed) in enumerate(plan, 1):
        elapsed = time.time() - started
        print(f"[{i}/{len(plan)}] {name} on {backbone}, seed {seed}  ({elapsed / 60:.1f} min so far)", flush=True)
        row = run_one(name, backbone, seed, args, runs_dir, out / "history", log=lambda s: print(s, flush=True))
        tail = f"best val acc {row['best_val_acc']:.4f}" if row["status"] == "ok" else row["reason"]
        print(f"[{i}/{len(plan)}] {row['status']}: {tail}", flush=True)
        rows.append(row)
    runs = pd.DataFrame(rows).reindex(columns=RUN_COLUMNS)
    command = "python -m experiments.compare_all " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    meta = {"command": command, "machine": machine_description(), "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M"), "data": str(args.data_dir),
            "quick": args.quick, "total_minutes": round((time.time() - started) / 60, 1)}
    summary = write_outputs(out, runs, meta)
    print(summary[["experiment", "backbone", "status", "best_val_acc_mean", "best_val_acc_std",
                   "train_seconds_mean"]].to_string(index=False))
    print(f"wrote {out}/summary.csv, runs.csv, plots and README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
