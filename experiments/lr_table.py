"""The recipes' learning rates against the range test's suggestion, in one table.

    python -m experiments.lr_table --data ../shared/data/hymenoptera_data --backbone efficientnet_lite0 \\
                                   [--recipes resnet_frozen two_stage ...]

runs the learning-rate range test (`main.py -e RECIPE --find-lr`, tl/engine/lr_finder.py) on
each recipe's first stage and writes to `--out` (default `results/`):

    lr_finder.csv   one row per recipe: its first stage, the reference group, the documented
                    rate, the suggested rate and suggested / documented
    lr_finder.md    the command, the machine, the measured time and that table, in words

Each recipe's plot and per-step CSV go to `--runs-dir` (default runs/lr-table-<time>/). A
ratio near 1 says the documents chose about what the range test would; one far from 1 is a
question for a training run at the suggested rate, not a verdict: the suggestion reads a
few dozen steps from the starting weights (see tl/engine/lr_finder.py for what it can and
cannot say). The range test reads the train split alone.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

from experiments import NAMES
from tl.engine import folders
from tl.engine.tables import page_code, page_text

COLUMNS = ["recipe", "stage", "group", "documented_lr", "suggested_lr", "ratio", "steps", "diverged", "no_window",
           "status", "reason"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.lr_table", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="data folder (default: $TL_DATA_DIR or data/hymenoptera_data)")
    p.add_argument("--backbone", default="efficientnet_lite0",
                   help="backbone under every recipe (default efficientnet_lite0: its weights work offline)")
    p.add_argument("--recipes", nargs="+", default=list(NAMES), choices=NAMES, metavar="RECIPE",
                   help="recipe names (default: all)")
    p.add_argument("--out", type=Path, default=Path("results"),
                   help="where lr_finder.md and .csv go (default results/)")
    p.add_argument("--runs-dir", type=Path, help="each recipe's plot and CSV (default runs/lr-table-<time>)")
    p.add_argument("--weights", help="imagenet | none | PATH for every recipe (default: each recipe's own)")
    p.add_argument("--steps", type=int, default=100, help="planned steps of each range test (default 100)")
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="smoke run: 8 images per class, 64-pixel images")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def find_one(name: str, args: argparse.Namespace, runs_dir: Path) -> dict:
    """One recipe's range test -> one row (status ok, or not run with the reason)."""
    from experiments import get_experiment
    from experiments.common import result_or_reason
    from tl.engine.lr_finder import find_lr, no_window
    from tl.engine.options import RunOptions
    from tl.engine.prepare import resolve_data_dir

    module = get_experiment(name)
    opts = RunOptions(data=resolve_data_dir(args.data), backbone=args.backbone, weights=args.weights,
                      device=args.device, seed=args.seed, workers=0, out=runs_dir, progress=False)
    if args.quick:
        opts.make_quick()
    r, reason = result_or_reason(lambda: find_lr(module.RECIPE, module.build, opts, steps=args.steps,
                                                 log=lambda line: None))
    if reason:
        return {"recipe": name} | reason
    return {"recipe": name, "stage": r.stage, "group": r.group, "documented_lr": r.recipe_lr,
            "suggested_lr": r.suggested_lr, "ratio": r.suggested_lr / r.recipe_lr, "steps": len(r.test.lrs),
            "diverged": r.test.diverged, "no_window": no_window(r.test) or "", "status": "ok", "reason": ""}


def page(rows: list[dict], meta: dict) -> str:
    """The markdown page: what was run, then the table."""
    from tl.engine.lr_finder import NO_WINDOW  # lazily, as run() imports the finder
    lines = ["# The recipes' learning rates and the range test's suggestion", "",
             f"Command: {page_code(meta['command'])}  ",
             f"Machine: {meta['machine']}; wall time {meta['seconds']:.0f} s.", "",
             "Each recipe's first stage, as its run would start it; every group's rate swept by the same factor per "
             "step, so the recipe's ratios between groups stay (the other groups' suggestions are theirs times the "
             "same ratio). Suggested: a tenth of the rate at the lowest smoothed loss (tl/engine/lr_finder.py): a "
             "starting point for a run, not a tuned rate.", "",
             "| recipe | stage | group | documented | suggested | suggested / documented | steps |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['recipe']} | not run: {page_text(r['reason'])} | | | | | |")
            continue
        steps = f"{r['steps']}{' (diverged)' if r['diverged'] else ''}"
        where = NO_WINDOW.get(r.get("no_window"))
        edge = f" (no window: lowest {where})" if where else ""
        lines.append(f"| {r['recipe']} | {r['stage']} | {r['group']} | {r['documented_lr']:.1e} | "
                     f"{r['suggested_lr']:.1e}{edge} | {r['ratio']:.3g} | {steps} |")
    if any(r.get("no_window") for r in rows):
        lines += ["", "*No window*: the smoothed loss was lowest at an end of the sweep, so the number is (near) "
                  "the sweep's edge divided by ten, not a rate the curve points to. Lowest within a decade of the "
                  "first rate (so the suggestion is below every rate tested), the smoothed loss never clearly fell "
                  "within the test's steps: a loss that moves slowly (random weights) or a per-batch loss too noisy "
                  "to show a dip (small batches: the tutorial recipes train with 4) "
                  "does this; such a row needs a longer test or larger batches, not the rate printed."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import torch

    from tl.engine.files import atomic_write_text, updating, writable_folder
    from tl.engine.images import check_layout
    from tl.engine.prepare import resolve_data_dir
    from tl.engine.tables import write_table

    args = parse_args(argv)
    args.data = resolve_data_dir(args.data)  # a folder that is not there, or not one of classes, stops here: one
    check_layout(args.data)  # error: line, and the table of an earlier command is left as it is
    writable_folder(args.out)  # so does a folder that cannot be written, before any training
    runs_dir = args.runs_dir or Path(f"runs/lr-table-{time.strftime('%Y%m%d-%H%M%S')}")
    started = time.time()
    rows = []
    for name in args.recipes:
        rows.append(find_one(name, args, runs_dir))
        r = rows[-1]
        print(f"{name}: " + (f"{r['group']} documented {r['documented_lr']:.1e}, suggested {r['suggested_lr']:.1e}"
                             if r["status"] == "ok" else f"not run ({r['reason']})"))
    meta = {"command": "python -m experiments.lr_table " + shlex.join(sys.argv[1:] if argv is None else argv),
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
            "seconds": time.time() - started}
    with updating(args.out, meta["command"]):  # one process at a time; the table and its page together
        folders.make(args.out)
        write_table(args.out / "lr_finder.csv", rows, COLUMNS)
        atomic_write_text(args.out / "lr_finder.md", page(rows, meta))
    print(f"-> {args.out / 'lr_finder.md'}, {args.out / 'lr_finder.csv'}")
    return 0


if __name__ == "__main__":
    from tl.engine.command import command  # the one error: line and exit 2 every command shares

    sys.exit(command(main))
