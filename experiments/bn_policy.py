"""What should BatchNorm do while a pretrained network adapts? Five policies, two data sets, several seeds.

    python main.py --prepare dogs-vs-cats --src ../shared/data/dogs-vs-cats-subset/train --dest data/dogs-vs-cats
    python -m experiments.bn_policy --data ../shared/data/hymenoptera_data data/dogs-vs-cats \\
        --backbone efficientnet_lite0 --seeds 0 1 2

A BatchNorm layer holds two kinds of state: a scale and shift (parameters, trained by the
optimizer when `requires_grad`) and a running mean and variance (buffers, updated by every
forward pass in train mode, whatever `requires_grad` says). So "freezing" a body does not
freeze its statistics, and documents 001 and 003 and the PyTorch tutorial let them drift.
The policies, everything else equal (Adam, the same epochs, batch size and seed):

    frozen_bn_train    body frozen, BN in train mode: statistics drift (001, 003, the tutorial)
    frozen_bn_eval     body frozen, BN in eval mode: truly fixed, features cacheable (resnet_frozen)
    frozen_bn_affine   filters frozen, BN scale/shift train, in train mode (000, fastai's train_bn)
    finetune_bn_train  everything trains, BN in train mode (resnet_finetune, the tutorial)
    finetune_bn_eval   everything trains, BN in eval mode: scale/shift learn, statistics stay (bn_eval)

For each run it records the headline accuracy (tl.engine.headline.score_headline: test accuracy of
the epoch chosen on val where the data has test/, else the final epoch's val accuracy:
never selected on the images it is scored on) and how far the running statistics moved
from ImageNet's, measured on the final epoch's weights (`drift`). It writes

    <out>/bn_policy.csv    one row per data set x policy x seed
    <out>/bn_policy.png    headline accuracy and statistics drift per policy, per data set

and, from the CSV alone, the section "BatchNorm policy" of docs/RECIPES.md
(`write_section`: every number and every conclusion in it is computed from the CSV).
`--quick` is a smoke run (8 images per class, 64 pixels, 1 epoch) that writes to
runs/quick-bn_policy/ and leaves results/ and the docs alone.

Defaults: 2 training epochs, batch 16, and at most 320 images per class and split, which
halves dogs-vs-cats' training set (641 per class) and leaves every other split of both data
sets whole (all have fewer). They keep the full study (2 data sets x 5 policies x 3 seeds =
30 runs of EfficientNet-Lite0) short on this project's 2-core CPU: the committed one
(results/bn_policy.csv) spent 10.7 minutes training, the sum of its train_seconds column
(evaluation and loading add to the wall time).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import time
from pathlib import Path

import torch

from experiments.recipes.resnet_bn_only import train_batchnorm
from tl.engine import folders
from tl.engine.command import say_error
from tl.engine.tables import page_text
from tl.models import param_groups, set_trainable
from tl.recipe import Recipe

EPOCHS, BATCH, MAX_PER_CLASS = 2, 16, 320  # see the module docstring: the full study in about 22 minutes here
FROZEN_LR, FINETUNE_LR = 1e-3, 1e-4  # 001's Adam default for a head; 003's fine-tuning rate

POLICIES = {  # name -> (Recipe for it, what trains); the recipes differ only where the policy does
    "frozen_bn_train": Recipe(name="frozen_bn_train", source="001/003, PyTorch tutorial",
                              strategy="body frozen, BatchNorm in train mode (statistics drift)",
                              lrs={"head": FROZEN_LR}, frozen_bn_eval=False),
    "frozen_bn_eval": Recipe(name="frozen_bn_eval", source="resnet_frozen",
                             strategy="body frozen, BatchNorm in eval mode (statistics fixed)",
                             lrs={"head": FROZEN_LR}, frozen_bn_eval=True),
    "frozen_bn_affine": Recipe(name="frozen_bn_affine", source="000, fastai train_bn",
                               strategy="filters frozen, BatchNorm scale/shift train (train mode)",
                               lrs={"all": FROZEN_LR}),
    "finetune_bn_train": Recipe(name="finetune_bn_train", source="003 §4, PyTorch tutorial",
                                strategy="everything trains, BatchNorm in train mode",
                                lrs={"all": FINETUNE_LR}),
    "finetune_bn_eval": Recipe(name="finetune_bn_eval", source="bn_eval",
                               strategy="everything trains, BatchNorm in eval mode (statistics fixed)",
                               lrs={"all": FINETUNE_LR}, bn_eval=True),
}
COLUMNS = ["dataset", "policy", "backbone", "seed", "train_epochs", "batch_size", "headline", "headline_acc",
           "final_val_acc", "best_val_acc", "headline_images", "bn_mean_shift", "bn_var_change", "train_seconds",
           "quick", "run"]


def build(model, spec, recipe):
    """What trains under each policy; BatchNorm's mode is the recipe's (frozen_bn_eval, bn_eval)."""
    if recipe.name.startswith("finetune"):
        set_trainable(model, spec, ["body", "neck", "head"])
    else:
        set_trainable(model, spec, ["head"])
        if recipe.name == "frozen_bn_affine":
            train_batchnorm(model, spec, recipe)  # scale and shift train; the filters stay
    return model, torch.optim.Adam(param_groups(model, spec, recipe.lrs))


def drift(before: dict, after: dict) -> dict:
    """How far the running statistics moved, averaged over BatchNorm layers (then channels):

    bn_mean_shift  |mean_after - mean_before| / sqrt(var_before + 1e-5): the shift in units of
                   the ImageNet standard deviation, 0.1 = a tenth of a standard deviation;
    bn_var_change  |log(var_after / var_before)|: 0.1 = about 10% larger or smaller variance.

    Both are exactly 0 when no statistic moved (an eval-mode layer)."""
    shifts, changes = [], []
    for key, mean0 in before.items():
        if not key.endswith("running_mean"):
            continue
        var_key = key[: -len("mean")] + "var"
        mean1, var0, var1 = after[key].double(), before[var_key].double(), after[var_key].double()
        shifts.append(((mean1 - mean0.double()).abs() / (var0 + 1e-5).sqrt()).mean().item())
        changes.append((var1.clamp_min(1e-12) / var0.clamp_min(1e-12)).log().abs().mean().item())
    return {"bn_mean_shift": sum(shifts) / len(shifts) if shifts else float("nan"),
            "bn_var_change": sum(changes) / len(changes) if changes else float("nan")}


def run_policy(policy: str, data: Path, backbone: str, seed: int, args, runs_dir: Path) -> dict:
    """One data set x policy x seed through the one loop (tl.engine.run.run) -> one CSV row."""
    from tl.engine import checkpoint
    from tl.engine.backbones import folder_label
    from tl.engine.options import RunOptions
    from tl.engine.run import run
    from tl.engine.tables import read_table
    from tl.engine.weights import build_model

    recipe = dataclasses.replace(POLICIES[policy], backbone=backbone, train_epochs=args.epochs,
                                 batch_size=args.batch_size)
    dataset = Path(data).resolve().name
    opts = RunOptions(data=Path(data), seed=seed, workers=args.workers, device=args.device,
                      out=runs_dir / dataset, run_name=f"{policy}-{folder_label(backbone)}-seed{seed}", progress=False,
                      plots=False, max_per_class=args.max_per_class)
    if args.quick:
        opts.make_quick()
        opts.epochs = None  # the study's own --epochs (1 with --quick) is already in the recipe
    result = run(recipe, build, opts, log=lambda line: None)
    res = result.config["results"]
    classes = len(result.classes)
    pretrained = build_model(backbone, classes, recipe.weights).state_dict()  # the statistics it started from
    final = checkpoint.load_checkpoint(result.run_dir / "last.ckpt")["model"]  # the final epoch, not best.pth
    return {"dataset": dataset, "policy": policy, "backbone": backbone, "seed": seed,
            "train_epochs": recipe.train_epochs, "batch_size": recipe.batch_size, "headline": res["headline"],
            "headline_acc": res["headline_acc"], "final_val_acc": res["final_val_acc"],
            "best_val_acc": res["best_val_acc"],
            "headline_images": len(read_table(result.run_dir / "headline_predictions.csv")),
            **drift(pretrained, final), "train_seconds": res["train_seconds"], "quick": args.quick,
            "run": str(result.run_dir)}


# ----------------------------------------------------------------------------- outputs
def summarize(df):
    """Mean and sample std over seeds per data set x policy (std empty for one seed)."""
    g = df.groupby(["dataset", "policy"], sort=False)
    out = g.agg(headline_mean=("headline_acc", "mean"), headline_std=("headline_acc", "std"),
                seeds=("seed", "nunique"), shift=("bn_mean_shift", "mean"), var_change=("bn_var_change", "mean"),
                seconds=("train_seconds", "mean"), images=("headline_images", "first"),
                headline=("headline", "first"), epochs=("train_epochs", "first"), batch=("batch_size", "first"))
    return out.reset_index()


def plot(df, path: Path) -> Path:
    """Per data set: headline accuracy (mean ± std over seeds) and the mean shift of the statistics,
    each bar labelled with its value (a shift of 0 is a result: the statistics did not move)."""
    from tl.engine.plots import plt, save_figure

    s = summarize(df)
    datasets = list(dict.fromkeys(s.dataset))
    fig, axes = plt.subplots(len(datasets), 2, figsize=(12, 3.4 * len(datasets)), squeeze=False,
                             layout="constrained")
    for row, dataset in zip(axes, datasets):
        d = s[s.dataset == dataset]
        acc, std = 100 * d.headline_mean, 100 * d.headline_std.fillna(0)
        row[0].barh(d.policy, acc, xerr=std, color="tab:blue")
        row[0].set_xlabel(f"headline accuracy, % ({d.headline.iloc[0]}; mean ± std over seeds)")
        row[0].set_xlim(max(0, (acc - std).min() - 5), 100)
        for y, value in enumerate(acc):
            row[0].text(row[0].get_xlim()[0], y, f" {value:.1f}", va="center", color="white", fontsize=8)
        row[1].barh(d.policy, d["shift"], color="tab:orange")
        row[1].set_xlabel("running-mean shift from ImageNet's\n(in ImageNet std units, mean over BatchNorm layers)")
        for y, value in enumerate(d["shift"]):
            row[1].text(value, y, f" {value:.3f}" + (" (unchanged)" if value == 0 else ""), va="center", fontsize=8)
        row[1].set_xlim(0, max(d["shift"].max(), 1e-9) * 1.35)
        row[0].set_title(dataset, loc="left")
    return save_figure(fig, path)


def _pct(x: float) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def section(df) -> str:
    """The docs/RECIPES.md section, every figure and conclusion computed from the rows `df`.

    "Beyond the noise" means: the difference of the means is larger than both the larger
    seed standard deviation of the two and one val/test image (1 / images)."""
    s = summarize(df)
    lines = ["## BatchNorm policy: what the statistics should do while the network adapts", "",
             "Produced by `python -m experiments.bn_policy` (results/bn_policy.csv, results/bn_policy.png). "
             "Five policies, everything else equal; headline = "
             + ", ".join(sorted(set(s.headline))) + " (never selected on the images it is scored on); "
             "shift = mean |running-mean change| in ImageNet standard deviations, var = mean |log variance "
             "ratio|, both over BatchNorm layers, on the final epoch's weights.", "",
             "| data set | policy | headline acc % (mean ± std) | seeds | mean shift | var change | train s |",
             "|---|---|---|---|---|---|---|"]
    for r in s.itertuples():
        std = f" ± {_pct(r.headline_std)}" if r.seeds > 1 else ""
        lines.append(f"| {page_text(r.dataset)} | {r.policy} | {_pct(r.headline_mean)}{std} | {r.seeds} "
                     f"| {r.shift:.3f} | {r.var_change:.3f} | {r.seconds:.0f} |")
    lines += ["", "\"Beyond the noise\" below is this study's own rule, simpler than the paired bootstrap of "
              "results/differences.csv: the difference of two means must exceed both the larger seed standard "
              "deviation of the two and one image.", ""]
    advice = []
    for dataset, d in s.groupby("dataset", sort=False):
        d = d.set_index("policy")
        noise_image = 1 / d.images.iloc[0]
        best = d.headline_mean.idxmax()
        lines.append(f"**{page_text(dataset)}** ({d.epochs.iloc[0]} epochs, batch {d.batch.iloc[0]}, "
                     f"{d.seeds.min()} seed(s); one image = {100 * noise_image:.2f} points): best mean headline "
                     f"{best} ({_pct(d.headline_mean[best])}%).")
        for a, b, what in (("frozen_bn_eval", "frozen_bn_train", "Frozen body: statistics fixed vs drifting"),
                           ("frozen_bn_affine", "frozen_bn_eval", "Frozen filters: BatchNorm scale/shift trained vs "
                                                                  "fixed"),
                           ("finetune_bn_eval", "finetune_bn_train", "Fine-tuning: BatchNorm in eval vs train mode")):
            if a in d.index and b in d.index:
                diff = d.headline_mean[a] - d.headline_mean[b]
                real = abs(diff) > max(noise_image, *(x for x in d.headline_std[[a, b]] if not math.isnan(x)))
                verdict = "beyond the noise" if real else "within the noise"
                lines.append(f"- {what}: {a} − {b} = {100 * diff:+.1f} points ({verdict}); statistics moved "
                             f"{d['shift'][a]:.3f} vs {d['shift'][b]:.3f}.")
                advice.append((dataset, a, b, diff, real))
        lines.append("")
    lines.append("**What to do** (from the comparisons above):")
    for dataset, a, b, diff, real in advice:
        if not real:
            pick = a if a.endswith("eval") else b
            why = ("it keeps the body a fixed function, so its features can be cached"
                   if pick == "frozen_bn_eval" else "it is the simpler of the two")
            lines.append(f"- {page_text(dataset)}, {a} vs {b}: no difference beyond the noise; prefer {pick}: {why}.")
        else:
            lines.append(f"- {page_text(dataset)}, {a} vs {b}: use {a if diff > 0 else b} "
                         f"({100 * abs(diff):.1f} points better).")
    return "\n".join(lines) + "\n"


START, END = "<!-- bn_policy:start -->", "<!-- bn_policy:end -->"


def write_section(csv_path: Path, doc: Path) -> Path:
    """Put `section()` of the CSV between the bn_policy markers of `doc` (appended the first time)."""
    from tl.engine.tables import read_table

    text = doc.read_text() if doc.is_file() else ""
    block = f"{START}\n{section(read_table(csv_path))}{END}"
    if START in text:
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    from tl.engine.files import atomic_write_text

    return atomic_write_text(doc, text)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.bn_policy", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", nargs="+", action="extend", metavar="DIR",
                   help="data folder(s) (default: ../shared/data/hymenoptera_data and data/dogs-vs-cats)")
    p.add_argument("--backbone", default="efficientnet_lite0", help="the backbone (default efficientnet_lite0)")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES), metavar="NAME")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs (default {EPOCHS}; --quick: 1)")
    p.add_argument("--batch-size", type=int, default=BATCH)
    p.add_argument("--max-per-class", type=int, default=MAX_PER_CLASS,
                   help=f"at most N images per class in each split (default {MAX_PER_CLASS}; --quick: 8)")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke run: 8 images per class, 64 pixels, 1 epoch")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for bn_policy.csv and .png (default results/; --quick: runs/quick-bn_policy)")
    p.add_argument("--doc", type=Path, default=None,
                   help="the Markdown file whose bn_policy section is rewritten (default docs/RECIPES.md; "
                        "--quick: <out>/RECIPES-bn_policy.md)")
    args = p.parse_args(argv)
    args.epochs = args.epochs or (1 if args.quick else EPOCHS)
    return args


def main(argv=None) -> int:
    import pandas as pd

    from tl.engine.files import updating, writable_folder
    from tl.engine.tables import write_table

    args = parse_args(argv)
    root = Path(__file__).resolve().parents[1]
    data = args.data or [root.parent / "shared" / "data" / "hymenoptera_data", Path("data/dogs-vs-cats")]
    missing = [str(d) for d in data if not Path(d).is_dir()]
    if missing:
        say_error(f"data folder(s) not found: {', '.join(missing)} (dogs-vs-cats: see the module docstring "
              f"for the --prepare command)")
        return 2
    out = args.out or (Path("runs/quick-bn_policy") if args.quick else Path("results"))
    doc = args.doc or (out / "RECIPES-bn_policy.md" if args.quick else root / "docs" / "RECIPES.md")
    for folder in (out, doc.parent):  # a folder that cannot be written stops the study before its training
        writable_folder(folder)
    runs_dir = Path("runs") / f"bn_policy-{time.strftime('%Y%m%d-%H%M%S')}"
    plan = [(d, p, s) for d in data for p in args.policies for s in args.seeds]
    rows, started = [], time.time()
    for i, (d, policy, seed) in enumerate(plan, 1):
        print(f"[{i}/{len(plan)}] {Path(d).name}: {policy}, seed {seed} ({(time.time() - started) / 60:.1f} min)",
              flush=True)
        rows.append(run_policy(policy, Path(d), args.backbone, seed, args, runs_dir))
        r = rows[-1]
        print(f"    headline {r['headline_acc']:.4f}, mean shift {r['bn_mean_shift']:.4f}", flush=True)
    with updating(out, "python -m experiments.bn_policy"):  # one process at a time; table, picture, page together
        folders.make(out)
        df = pd.DataFrame(rows).reindex(columns=COLUMNS)
        write_table(out / "bn_policy.csv", df)
        plot(df, out / "bn_policy.png")
        write_section(out / "bn_policy.csv", doc)
    print(f"wrote {out / 'bn_policy.csv'}, {out / 'bn_policy.png'} and the section in {doc} "
          f"({(time.time() - started) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    from tl.engine.command import command  # the one error: line and exit 2 every command shares

    sys.exit(command(main))
