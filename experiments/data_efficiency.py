"""How many images does each strategy need? Accuracy against training images per class.

    python -m experiments.data_efficiency --data ../shared/data/hymenoptera_data --backbone efficientnet_lite0

trains every strategy (scratch, frozen head, full fine-tune, two-stage) on 2, 5, 10, 25, 50
and all training images per class, with several seeds, and writes to `--out` (default
`results/`):

    data_efficiency.csv   one row per strategy x images per class x seed: the headline accuracy
                          and the run's figures (status "not run" with the reason where it could not)
    data_efficiency.png   headline accuracy against images per class (log scale), one line per
                          strategy: the mean over seeds, the band from the lowest to the highest seed
    data_efficiency.md    the command, machine, measured wall time and the table of means, in words

The protocol is the comparison's (experiments/compare_all.py), with only the amount of
training data changed:

* Each recipe keeps its own numbers (optimizer, learning rates, batch size): the question
  is "this recipe, with fewer images", not "a recipe retuned for fewer images". The epochs
  are the recipe's own, except where `EPOCHS` below shortens a full-network strategy to fit
  the study in 45 minutes on a 2-core CPU; the same number at every subset size.
  `--epochs N` sets every strategy's epochs.
* The subsets are drawn once, from `--split-seed` (default 0), by `tl.engine.selection.nested_draw`:
  class-balanced and nested (the 5 images of a class include its 2, the 10 include the 5),
  so a curve that rises shows the value of *more* images, not of *other* images. The
  training `--seeds` change initialisation, augmentation and order, never the subset.
  "all" is every training image (not balanced when the classes differ in size).
* Val is untouched at every size, and the headline is the comparison's: the final epoch's
  val accuracy where there is no test split, else the test accuracy of the epoch chosen on
  val (`tl.engine.headline.score_headline`): nothing is selected on the images it is scored on.
* Speed: each run keeps its decoded images in memory (`--image-cache`, with no worker
  processes, the fastest setting on a CPU with few cores: results/benchmark.md), and the
  frozen recipe computes the val features once (the feature cache; its augmented train
  images still go through the backbone each epoch, as in the comparison).

The strategy list is data (`STRATEGIES`, recipe names): a recipe that does not exist yet
(`two_stage` comes with its own issue) is reported as not run, with a note, and the others
go on. Rows are keyed by (data set, strategy, backbone): running some `--strategies` again
replaces only their rows, so a strategy added later joins the existing table.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

from experiments import NAMES
from tl.engine.tables import page_code

# the four strategies, as recipe names: from scratch, frozen head, full fine-tune, two-stage
STRATEGIES = ("resnet_scratch", "resnet_frozen", "resnet_finetune", "two_stage")
# Training epochs of each strategy in this study (None: the recipe's own). Every epoch of a
# full-network strategy ends with a val pass through the whole network, which costs as much
# at 2 images per class as with all of them; at the recipes' 10 epochs that alone would take
# the study past its 45 minutes on this project's 2-core CPU (reckoned from the committed
# comparison's val and train speeds, results/history/ and results/benchmark.md; the page
# this study writes records the measured time). The frozen recipe validates on cached
# features, so it keeps its own 13. The same number at every size: only the images change.
EPOCHS: dict[str, int | None] = {"resnet_scratch": 5, "resnet_finetune": 5, "resnet_frozen": None}
SIZES = ("2", "5", "10", "25", "50", "all")  # training images per class
QUICK_SIZES = ("2", "5", "all")  # --quick keeps 8 images per class: larger subsets do not exist there
KEY = ["dataset", "strategy", "backbone"]
COLUMNS = ["dataset", "strategy", "backbone", "images_per_class", "train_images", "seed", "split_seed", "status",
           "reason", "train_epochs", "headline", "headline_acc", "best_val_acc", "final_val_acc", "train_seconds",
           "wall_seconds", "quick", "run"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.data_efficiency", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="data folder (default: $TL_DATA_DIR or data/hymenoptera_data)")
    p.add_argument("--backbone", default="efficientnet_lite0",
                   help="backbone under every strategy (default efficientnet_lite0: its weights work offline)")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), metavar="RECIPE",
                   help=f"recipe names (default: {' '.join(STRATEGIES)})")
    p.add_argument("--sizes", nargs="+", default=None, metavar="N",
                   help=f"training images per class, or 'all' (default: {' '.join(SIZES)})")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (default 0 1 2)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the subset draw (default 0)")
    p.add_argument("--epochs", type=int, help="training epochs for every recipe (default: each recipe's own)")
    p.add_argument("--out", type=Path, help="tables and plot (default results/; with --quick "
                   "runs/quick-data-efficiency/, so a smoke run never overwrites the committed results)")
    p.add_argument("--runs-dir", type=Path, help="run folders (default runs/data-efficiency-<time>)")
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="smoke run: 8 images per class, 1 epoch, 64-pixel images")
    args = p.parse_args(argv)
    args.sizes = args.sizes or list(QUICK_SIZES if args.quick else SIZES)
    for size in args.sizes:
        if size != "all" and not (size.isdigit() and int(size) > 0):
            p.error(f"--sizes takes whole numbers above 0 or 'all', got {size!r}")
    if args.epochs is not None and args.epochs < 1:
        p.error("--epochs must be at least 1")
    args.out = args.out or Path("runs/quick-data-efficiency" if args.quick else "results")
    return args


def run_one(strategy: str, size: str, seed: int, args: argparse.Namespace, runs_dir: Path, log) -> dict:
    """One strategy x subset size x seed -> one row (status ok / not run / failed)."""
    from experiments import get_experiment
    from experiments.common import result_or_reason
    from tl.engine.options import RunOptions, resolve
    from tl.engine.prepare import resolve_data_dir
    from tl.engine.run import run

    data = resolve_data_dir(args.data)
    n = None if size == "all" else int(size)
    row = {"dataset": data.resolve().name, "strategy": strategy, "backbone": args.backbone, "images_per_class": size,
           "seed": seed, "split_seed": args.split_seed, "quick": args.quick, "run": f"{strategy}-n{size}-seed{seed}"}
    if strategy not in NAMES:
        return row | {"status": "not run", "reason": f"recipe {strategy} does not exist yet in experiments/"}
    module = get_experiment(strategy)
    epochs = args.epochs if args.epochs is not None else None if args.quick else EPOCHS.get(strategy)
    opts = RunOptions(data=data, backbone=args.backbone, epochs=epochs, seed=seed, split_seed=args.split_seed,
                      train_per_class=n, device=args.device, workers=0, image_cache=True, out=runs_dir,
                      run_name=row["run"], progress=False, plots=False)
    if args.quick:
        opts.make_quick()
    row["train_epochs"] = resolve(module.RECIPE, opts).train_epochs
    started = time.time()
    result, reason = result_or_reason(lambda: run(module.RECIPE, module.build, opts, log=lambda line: None))
    if reason:
        return row | reason
    res = result.config["results"]
    return row | {"status": "ok", "reason": "", "train_images": result.config["dataset_sizes"]["train"],
                  "wall_seconds": time.time() - started,
                  **{k: res[k] for k in ("headline", "headline_acc", "best_val_acc", "final_val_acc",
                                         "train_seconds")}}


def merge(old, new):
    """The rows of `new`, plus the rows of `old` whose key (data set, strategy, backbone) `new` did
    not run, from a run of the same kind (--quick or not): a strategy run later joins the table."""
    import pandas as pd

    if old is None or not len(old):
        return new
    ran = set(map(tuple, new[KEY].values))
    quick = bool(new.quick.iloc[0])
    keep = old[[tuple(k) not in ran and bool(q) == quick for k, q in zip(old[KEY].values, old.quick)]]
    return pd.concat([keep, new], ignore_index=True) if len(keep) else new


def _x(table, classes: int) -> list[float]:
    """Where each row sits on the x axis: its images per class; "all" at the mean class size."""
    return [float(s) if s != "all" else t / classes for s, t in zip(table.images_per_class, table.train_images)]


def plot(table, path: Path, title: str, classes: int) -> Path:
    """Headline accuracy against images per class (log x), one line per strategy: the mean over
    seeds, a band from the lowest to the highest seed, the seeds as dots."""
    from tl.engine.plots import plt, save_figure

    ok = table[table.status == "ok"].copy()
    fig, ax = plt.subplots(figsize=(7.5, 5), layout="constrained")
    ok["x"] = _x(ok, classes)
    for strategy, g in ok.groupby("strategy", sort=False):
        stats = g.groupby("x").headline_acc.agg(["mean", "min", "max", "count"]).sort_index()
        (line,) = ax.plot(stats.index, stats["mean"], marker="o", label=f"{strategy} ({stats['count'].max()} seeds)")
        ax.fill_between(stats.index, stats["min"], stats["max"], color=line.get_color(), alpha=0.18)
        ax.scatter(g.x, g.headline_acc, s=8, color=line.get_color(), alpha=0.6)
    ticks = sorted(set(ok.x))
    labels = {x: (s if s != "all" else f"all\n({x:.0f})") for x, s in zip(ok.x, ok.images_per_class)}
    ax.set_xscale("log")
    ax.set_xticks(ticks, [labels[t] for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("training images per class (log scale; nested subsets)")
    ax.set_ylabel(f"headline accuracy ({ok.headline.iloc[0] if len(ok) else 'val'})")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    missing = sorted(set(table.strategy) - set(ok.strategy))
    if missing:
        ax.text(0.01, 0.01, "not run: " + ", ".join(missing), transform=ax.transAxes, fontsize=8, color="gray")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, path)


def page(table, commands: list[dict]) -> str:
    """data_efficiency.md: what ran, on what, how long; the table of means; what was not run."""
    ok = table[table.status == "ok"]
    lines = ["# Data efficiency: accuracy against training images per class", ""]
    for meta in commands:
        lines.append(f"Produced by {page_code(meta['command'])} on {meta['machine']}, torch {meta['torch']} "
                     f"({meta['date']}): {meta['wall_minutes']:.1f} min of wall time for "
                     f"{', '.join(meta['strategies'])}.")
    lines += ["", "Headline accuracy, % (mean ± std over seeds; " + (ok.headline.iloc[0] if len(ok) else "") + "). "
              "The subsets are nested and class-balanced, drawn once with split seed "
              f"{commands[-1]['split_seed']}; each recipe keeps its optimizer and batch size.", ""]
    if len(ok):
        sizes = list(dict.fromkeys(ok.images_per_class))
        stats = ok.groupby(["strategy", "images_per_class"], sort=False).headline_acc.agg(["mean", "std", "count"])
        lines.append("| strategy | epochs | " + " | ".join(f"{s} / class" for s in sizes) + " |")
        lines.append("|---|---|" + "---|" * len(sizes))
        for strategy in dict.fromkeys(ok.strategy):
            cells = []
            for s in sizes:
                if (strategy, s) in stats.index:
                    m, sd, c = stats.loc[(strategy, s)]
                    cells.append(f"{100 * m:.1f}" + (f" ± {100 * sd:.1f}" if c > 1 else "") + f" ({int(c)})")
                else:
                    cells.append("")
            epochs = ", ".join(str(int(e)) for e in sorted(set(ok[ok.strategy == strategy].train_epochs)))
            lines.append(f"| {strategy} | {epochs} | " + " | ".join(cells) + " |")
        lines += ["", "(n) = seeds. ![accuracy against images per class](data_efficiency.png)", ""]
    for strategy, g in table[table.status != "ok"].groupby("strategy", sort=False):
        lines.append(f"- {strategy}: {g.status.iloc[0]} ({g.reason.iloc[0]}), {len(g)} run(s)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import pandas as pd
    import torch

    from tl.engine.files import atomic_write_text, updating, writable_folder, write_json
    from tl.engine.images import check_layout
    from tl.engine.prepare import resolve_data_dir
    from tl.engine.tables import read_table, write_table

    started = time.time()
    runs_dir = args.runs_dir or Path("runs") / f"data-efficiency-{time.strftime('%Y%m%d-%H%M%S')}"
    writable_folder(args.out)  # a folder that cannot be written stops the study now, not after its training
    missing = [s for s in args.strategies if s not in NAMES]
    for s in missing:
        print(f"note: recipe {s!r} does not exist yet in experiments/ (known: {', '.join(NAMES)}); "
              f"its rows say 'not run' and the other strategies go on")
    rows = []
    for strategy in args.strategies:
        for size in args.sizes:
            for seed in args.seeds:
                t = time.time()
                row = run_one(strategy, size, seed, args, runs_dir, print)
                rows.append(row)
                if strategy not in missing:
                    acc = f"{row['headline_acc']:.4f}" if row["status"] == "ok" else row["reason"]
                    print(f"{strategy:<16} {size:>4}/class seed {seed}: {row['status']} {acc} "
                          f"({time.time() - t:.0f} s)", flush=True)
    new = pd.DataFrame(rows).reindex(columns=COLUMNS)
    for column in ("train_images", "train_epochs"):  # whole numbers, empty where a run did not start
        new[column] = new[column].astype("Int64")
    csv, history = args.out / "data_efficiency.csv", args.out / "data_efficiency.json"
    wall = time.time() - started
    meta = {"command": "python -m experiments.data_efficiency " + shlex.join(sys.argv[1:] if argv is None else argv),
            "strategies": args.strategies, "quick": args.quick,
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
            "torch": torch.__version__, "wall_minutes": wall / 60, "split_seed": args.split_seed,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    classes = len(check_layout(resolve_data_dir(args.data)))
    # one process at a time merges its rows into the table (a second waits), and the table, its
    # record, its picture and its page change together, or none does
    with updating(args.out, meta["command"]):
        table = merge(read_table(csv, text=["images_per_class"]) if csv.is_file() else None, new)
        earlier = json.loads(history.read_text()).get("commands", []) if history.is_file() and len(table) > len(new) \
            else []  # every command whose rows the table still holds
        kept = [m for m in earlier if set(m["strategies"]) - set(args.strategies) and m["quick"] == args.quick]
        # a size is text ("8" or "all"); in the file a count is a number, as a spreadsheet shows it
        write_table(csv, table.assign(images_per_class=[s if s == "all" else int(s) for s in table.images_per_class]))
        write_json(history, {"commands": [*kept, meta]})
        plot(table, args.out / "data_efficiency.png",
             f"{table.dataset.iloc[0]}, {args.backbone}: accuracy against training images per class", classes)
        atomic_write_text(args.out / "data_efficiency.md", page(table, [*kept, meta]))
    print(f"wrote {csv}, data_efficiency.png, data_efficiency.md ({wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    from tl.engine.command import command  # the one error: line and exit 2 every command shares

    sys.exit(command(main))
