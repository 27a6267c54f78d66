"""Unbalanced classes: what do class weights and a balanced sampler buy?

    python main.py --prepare dogs-vs-cats --src ../shared/data/dogs-vs-cats-subset/train --dest data/dogs-vs-cats
    python -m experiments.imbalance --data data/dogs-vs-cats --seeds 0 1 2

makes the training set unbalanced on purpose: a seeded 10% of the training cats is kept
(`--keep cat=0.1`, the run option `train_fraction`, applied by `select_images`, the one
function that chooses a run's images; val and test are untouched, so every run is scored on
the same balanced images). Then each recipe (`resnet_frozen`, `resnet_finetune`) on
efficientnet_lite0 trains three ways with every seed:

    plain      the recipe as it is
    weights    --class-weights auto: the inverse class frequency in the cross-entropy
    sampler    --balanced-sampler: every class drawn equally often (with replacement)

and its headline model (test, the epoch chosen on val: tl/engine/headline.score_headline) is
scored per image. Writes to `--out` (default `results/`):

    imbalance.csv               one row per recipe x way x seed: accuracy, balanced accuracy and
                                the minority class's recall on the headline split, and the run's figures
    imbalance/<run>.csv         each run's per-image headline predictions (path, label, prediction)
    imbalance.md                the command, machine and time; the means; and, against plain, each
                                way's differences with their 95% intervals (the paired bootstrap of
                                experiments/report.py, over seeds and images)

Balanced accuracy is bootstrapped like accuracy, as a mean over images: image i counts
N / (C * n_c(i)) times its correctness (so every class weighs the same); the minority
recall is the accuracy on the minority class's images alone.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from tl.engine import folders
from tl.engine.command import say_error
from tl.engine.tables import page_code, page_text

RECIPES = ("resnet_frozen", "resnet_finetune")
WAYS = {"plain": {}, "weights": {"class_weights": "auto"}, "sampler": {"balanced_sampler": True}}
COLUMNS = ["recipe", "backbone", "way", "seed", "status", "reason", "minority", "kept", "train_counts", "headline",
           "accuracy", "balanced_accuracy", "minority_recall", "macro_f1", "best_epoch", "train_seconds", "run"]


def _keep(text: str) -> tuple[str, float]:
    name, _, value = text.rpartition("=")
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CLASS=FRACTION such as cat=0.1, got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.imbalance", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/dogs-vs-cats", help="a data folder with train/ val/ test/ (default "
                   "data/dogs-vs-cats, made by main.py --prepare dogs-vs-cats)")
    p.add_argument("--keep", type=_keep, default=("cat", 0.1), metavar="CLASS=FRACTION",
                   help="the minority: keep this seeded fraction of one class's training images (default cat=0.1)")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), metavar="RECIPE")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", help="imagenet | none | PATH (default: each recipe's own, ImageNet)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--split-seed", type=int, default=0, help="seed of the draw of the kept images (default 0)")
    p.add_argument("--epochs", type=int, help="training epochs of every recipe (default: each recipe's own)")
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument("--runs-dir", type=Path, help="run folders (default runs/imbalance-<time>)")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke run: 8 images per class, 1 epoch, 64-pixel images")
    return p.parse_args(argv)


def scores(predictions: Path, minority: str) -> dict:
    from tl.engine.metrics import report_of_predictions

    report = report_of_predictions(predictions)
    recall = dict(zip(report["classes"], report["recall"]))
    return {"accuracy": report["accuracy"], "balanced_accuracy": report["balanced_accuracy"],
            "macro_f1": report["macro_f1"], "minority_recall": recall.get(minority, np.nan)}


def run_one(recipe: str, way: str, seed: int, args: argparse.Namespace, runs_dir: Path,
            log) -> tuple[dict, Path | None]:
    """One recipe x way x seed: (its row, its headline predictions file, or None when it did not run)."""
    from experiments import get_experiment
    from experiments.common import train_or_reason
    from tl.engine.backbones import folder_label
    from tl.engine.options import RunOptions

    minority, fraction = args.keep
    label = f"{recipe}-{folder_label(args.backbone)}-{way}-seed{seed}"
    row = {"recipe": recipe, "backbone": args.backbone, "way": way, "seed": seed, "minority": minority,
           "kept": fraction, "run": label}
    opts = RunOptions(data=Path(args.data), backbone=args.backbone, weights=args.weights, epochs=args.epochs, seed=seed,
                      split_seed=args.split_seed, workers=args.workers, device=args.device, out=runs_dir,
                      run_name=label, progress=False, plots=False, train_fraction={minority: fraction}, **WAYS[way])
    if args.quick:
        opts.make_quick()
    module = get_experiment(recipe)
    result, failure = train_or_reason(module, opts, log)
    if failure:
        return row | failure, None
    res = result.config["results"]
    predictions = result.run_dir / "headline_predictions.csv"
    counts = " ".join(f"{c}={n}" for c, n in result.config["train_class_counts"].items())
    return row | {"status": "ok", "reason": "", "headline": res["headline"], "best_epoch": res["best_epoch"],
                  "train_seconds": res["train_seconds"], "train_counts": counts,
                  **scores(predictions, minority)}, predictions


def _per_image(out: Path, runs) -> dict:
    """{(recipe, way): {seed: DataFrame(path -> label, correct)}} from out/imbalance/<run>.csv."""
    from tl.engine.tables import read_table

    found: dict = {}
    for r in runs[runs.status == "ok"].itertuples():
        p = read_table(out / "imbalance" / f"{r.run}.csv", text=("path", "label", "prediction")).set_index("path")
        found.setdefault((r.recipe, r.way), {})[int(r.seed)] = p.assign(correct=(p.label == p.prediction).astype(int))
    return found


def differences(out: Path, runs, minority: str):
    """Each way against plain, per recipe: accuracy, balanced accuracy and minority recall,
    the paired bootstrap over the seeds both ran and the images they share."""
    import pandas as pd

    from experiments.common import paired_bootstrap

    found, rows = _per_image(out, runs), []
    for recipe in dict.fromkeys(runs.recipe):
        plain = found.get((recipe, "plain"), {})
        for way in [w for w in WAYS if w != "plain" and (recipe, w) in found]:
            other = found[(recipe, way)]
            seeds = sorted(set(plain) & set(other))
            if not seeds:
                continue
            images = sorted(set.intersection(*(set(d.index) for d in [*map(plain.get, seeds), *map(other.get, seeds)])))
            labels = plain[seeds[0]].loc[images, "label"]
            counts = labels.value_counts()
            weight = (len(images) / (len(counts) * labels.map(counts))).to_numpy()  # balanced accuracy as a mean
            minority_images = labels.index[labels == minority]
            for measure, cols, scale in (("accuracy", images, 1.0), ("balanced_accuracy", images, weight),
                                         ("minority_recall", minority_images, 1.0)):
                if not len(cols):
                    continue
                a = np.stack([other[s].loc[cols, "correct"].to_numpy() for s in seeds]) * scale
                b = np.stack([plain[s].loc[cols, "correct"].to_numpy() for s in seeds]) * scale
                diff, low, high = paired_bootstrap(a, b)
                rows.append({"recipe": recipe, "way": way, "measure": measure, "seeds": len(seeds),
                             "images": len(cols), "diff": diff, "low": low, "high": high,
                             "verdict": "better than plain" if low > 0 else "worse than plain" if high < 0
                             else "within noise"})
    return pd.DataFrame(rows, columns=["recipe", "way", "measure", "seeds", "images", "diff", "low", "high",
                                       "verdict"])


def plot(runs, path: Path, minority: str) -> Path:
    """Per recipe: accuracy, balanced accuracy and the minority class's recall for each way
    (mean ± std over seeds, seeds as dots), on a 0-1 axis: the minority's recall is the point."""
    from tl.engine.plots import plt, save_figure

    ok = runs[runs.status == "ok"]
    recipes = list(dict.fromkeys(ok.recipe))
    measures = (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"),
                ("minority_recall", f"{minority} recall"))
    fig, axes = plt.subplots(1, max(1, len(recipes)), figsize=(5.5 * max(1, len(recipes)), 4.2), squeeze=False,
                             sharey=True, layout="constrained")
    for ax, recipe in zip(axes[0], recipes):
        part = ok[ok.recipe == recipe]
        for k, (column, label) in enumerate(measures):
            for i, way in enumerate(WAYS):
                values = part[part.way == way][column].astype(float)
                x = i + (k - 1) * 0.25
                ax.errorbar([x], [values.mean()], yerr=[values.std(ddof=0) if len(values) > 1 else 0], fmt="o",
                            color=f"C{k}", capsize=3, label=label if i == 0 else None)
                ax.scatter([x] * len(values), values, s=10, color=f"C{k}", alpha=0.4)
        ax.set_xticks(range(len(WAYS)), list(WAYS))
        ax.set_ylim(0, 1.02)
        ax.set_title(recipe, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("on the untouched test split")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside lower center", ncol=3, fontsize=8)
    fig.suptitle(f"training {minority} kept at a fraction: plain, class weights, balanced sampler")
    return save_figure(fig, path)


def write_page(out: Path, runs, diffs, command: str, minutes: float) -> Path:
    from experiments.common import git_commit, machine_description

    ok = runs[runs.status == "ok"]
    minority, kept = runs.minority.iloc[0], runs.kept.iloc[0]
    lines = ["# Unbalanced classes: plain, class weights, balanced sampler",
             "(generated by `python -m experiments.imbalance`; do not edit by hand)", "",
             f"- command: {page_code(command)}",
             f"- commit {git_commit()}, {time.strftime('%Y-%m-%d %H:%M')}, {minutes:.1f} min",
             f"- machine: {machine_description()}",
             f"- training set: a seeded {100 * kept:g}% of the {page_text(minority)} images kept "
             f"({page_text(', '.join(sorted(set(ok.train_counts.dropna()))))}); val and test untouched", "",
             "Mean ± sample std over seeds, in %, on the headline split (" + ", ".join(sorted(set(ok.headline))) + ").",
             "", "| recipe | way | seeds | accuracy | balanced accuracy | minority recall | macro-F1 |",
             "|---|---|---|---|---|---|---|"]
    for (recipe, way), g in ok.groupby(["recipe", "way"], sort=False):
        cells = [f"{100 * g[c].mean():.1f}" + (f" ± {100 * g[c].std():.1f}" if len(g) > 1 else "")
                 for c in ("accuracy", "balanced_accuracy", "minority_recall", "macro_f1")]
        lines.append(f"| {recipe} | {way} | {len(g)} | " + " | ".join(cells) + " |")
    lines += ["", "**Against plain** (the way's figure minus plain's, in points, with its 95% interval: 4,000 "
              "paired bootstrap draws of seeds and images; a difference counts only when the interval leaves out 0):",
              ""]
    for r in diffs.itertuples():
        lines.append(f"- {r.recipe}, {r.way}, {r.measure.replace('_', ' ')}: {100 * r.diff:+.1f} "
                     f"[{100 * r.low:+.1f}, {100 * r.high:+.1f}] ({r.verdict}; {r.seeds} seed(s), {r.images} images)")
    not_ok = runs[runs.status != "ok"]
    lines += [f"- not run: {r.run}: {r.reason}" for r in not_ok.itertuples()]
    from tl.engine.files import atomic_write_text

    return atomic_write_text(out / "imbalance.md", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import pandas as pd

    from experiments.common import unchanged
    from tl import Interrupted
    from tl.engine.files import atomic_copy, updating, writable_folder
    from tl.engine.images import check_layout
    from tl.engine.prepare import resolve_data_dir
    from tl.engine.tables import write_table

    args.data = resolve_data_dir(args.data)  # a folder that is not there, or not one of classes, stops here: one
    check_layout(args.data)  # error: line, and the table of an earlier command is left as it is
    writable_folder(args.out)  # so does a folder that cannot be written, before any training
    runs_dir = args.runs_dir or Path("runs") / f"imbalance-{time.strftime('%Y%m%d-%H%M%S')}"
    if runs_dir.is_dir() and any(runs_dir.iterdir()):
        say_error(f"--runs-dir {runs_dir} already holds runs; choose a new folder")
        return 2
    command = "python -m experiments.imbalance " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    plan = [(r, w, s) for r in args.recipes for w in WAYS for s in args.seeds]
    started, rows, files = time.time(), [], {}
    for i, (recipe, way, seed) in enumerate(plan, 1):
        print(f"[{i}/{len(plan)}] {recipe} on {args.backbone}, {way}, seed {seed}", flush=True)
        try:
            row, predictions = run_one(recipe, way, seed, args, runs_dir, log=lambda s: print(s, flush=True))
        except (Interrupted, KeyboardInterrupt):  # command() says it, with 130 for Ctrl-C and 143 for SIGTERM
            raise Interrupted(f"interrupted: {unchanged(args.out, runs_dir)}") from None
        if predictions is not None:
            files[row["run"]] = predictions
        rows.append(row)
        print(f"[{i}/{len(plan)}] {row['status']}: " + (f"accuracy {row['accuracy']:.4f}, balanced accuracy "
              f"{row['balanced_accuracy']:.4f}, {args.keep[0]} recall {row['minority_recall']:.4f}"
              if row["status"] == "ok" else row["reason"]), flush=True)
    with updating(args.out, command):  # one process at a time; the table, its picture and its page together
        folders.make(args.out / "imbalance")
        for run, predictions in files.items():
            atomic_copy(predictions, args.out / "imbalance" / f"{run}.csv")
        runs = pd.DataFrame(rows).reindex(columns=COLUMNS)
        write_table(args.out / "imbalance.csv", runs)
        plot(runs, args.out / "imbalance.png", args.keep[0])
        diffs = differences(args.out, runs, args.keep[0])
        page = write_page(args.out, runs, diffs, command, (time.time() - started) / 60)
    print(f"wrote {args.out / 'imbalance.csv'}, imbalance.png and {page}")
    return 0


if __name__ == "__main__":
    from tl.engine.command import command  # the one error: line and exit 2 every command shares

    sys.exit(command(main))
