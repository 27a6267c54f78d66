"""Write `results/README.md` from the files compare_all wrote: generated, never typed.

    python -m experiments.report [RESULTS]          # default: results/

Every number in the page is read from `summary.csv`, `runs.csv`, `meta.json` and the
per-image predictions in `predictions/`, so rerunning the comparison and then this script
rewrites the page to match. The headline model's macro-F1 and balanced accuracy are computed
here from those predictions, without training anything again, and added to `summary.csv`.
For the project's own `results/` it also rewrites the results blocks (between
`<!-- results:start -->` and `<!-- results:end -->`) of README.md and docs/RECIPES.md.

Which differences are real? Each headline accuracy moves with the seed (initialisation,
batch order, augmentation) and with which images happened to be in the scored split. The
paired bootstrap below resamples both, the same draws for the two recipes compared, and
calls a difference real only when its 95% interval leaves out 0.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from itertools import combinations
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd

from experiments.common import DRAWS, paired_bootstrap
from tl.engine.class_names import one_line
from tl.engine.command import say_error
from tl.engine.tables import page_code, page_text, read_table, write_table

NOTES = {  # what each recipe is meant to show; the figures that follow come from the CSV
    "resnet_scratch": "No pretrained weights: the control. Whatever the others gain over it is what ImageNet buys.",
    "resnet_finetune": "Pretrained start, every layer trains at a small learning rate.",
    "resnet_frozen": "Pretrained body frozen (BatchNorm in eval mode); only the new head learns.",
    "resnet_bn_only": "Only BatchNorm scale/shift and the head train; the filters stay as ImageNet left them.",
    "vgg_transfer": "Only the new output layer trains, with SGD, for one epoch as in document 002.",
    "vgg_finetune": "Everything trains for one epoch, in three SGD groups with their own learning rates.",
    "vgg_stacked": "The whole ImageNet network, its 1000-class output included, stays frozen; a Linear(1000, 1) "
                   "on those logits learns, one logit with a sigmoid (BCE).",
    "tutorial_finetune": "The PyTorch tutorial's fine-tune: everything trains with SGD, momentum 0.9, batch 4, "
                         "the rate cut tenfold every 7 of 25 epochs; BatchNorm in train mode.",
    "tutorial_frozen": "The PyTorch tutorial's fixed feature extractor: only the head trains, but BatchNorm stays "
                       "in train mode, so the frozen body's statistics drift.",
    "two_stage": "fastai's fine_tune: one one-cycle epoch for the head (and BatchNorm) on the frozen body, then "
                 "everything at discriminative rates, one-cycle again.",
    "modern_finetune": "Current practice: head first on the frozen body, then everything; AdamW, warmup + cosine, "
                       "label smoothing, TrivialAugment.",
}


def note(experiment: str) -> str:
    searched_on, _, base = experiment.rpartition("tuned_")  # lite0_tuned_X: X with Lite0's numbers
    if base in NOTES and searched_on.endswith("_"):
        return (f"{base} with the numbers a search chose for efficientnet_{searched_on[:-1]} on this data set, "
                f"used unchanged on this backbone: no search ran for it, so these are not its tuned numbers.")
    if experiment.startswith("tuned_"):
        return (f"{experiment[len('tuned_'):]} with its numbers chosen by a search on an inner split of train "
                f"(python -m experiments.tune: val and test unseen), then trained and scored like the others.")
    return NOTES.get(experiment, "")


def verdict(low: float, high: float) -> str:
    return "A beats B" if low > 0 else "B beats A" if high < 0 else "within noise"


def correctness(out: Path, runs: pd.DataFrame, dataset: str, experiment: str, backbone: str) -> dict[int, pd.Series]:
    """{seed: per-image 1/0 (indexed by image path)} of one recipe's ok runs, from predictions/."""
    ok = runs[(runs.dataset == dataset) & (runs.experiment == experiment) & (runs.backbone == backbone)
              & (runs.status == "ok")]
    found = {}
    for run, seed in zip(ok.run, ok.seed):
        path = out / "predictions" / dataset / f"{run}.csv"
        if path.is_file():
            p = read_table(path, text=("path", "label", "prediction"))
            found[int(seed)] = pd.Series((p.label == p.prediction).astype(int).values, index=p.path)
    return found


def differences(out: Path, summary: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Every pair of ok recipes within a data set, compared on the seeds and images they share."""
    rows = []
    ok = summary[summary.status == "ok"]
    for dataset, group in ok.groupby("dataset", sort=False):
        scores = {(r.experiment, r.backbone): correctness(out, runs, dataset, r.experiment, r.backbone)
                  for r in group.itertuples()}
        for ka, kb in combinations(scores, 2):
            seeds = sorted(set(scores[ka]) & set(scores[kb]))
            if not seeds:
                continue
            images = sorted(set.intersection(*(set(scores[k][s].index) for k in (ka, kb) for s in seeds)))
            if not images:
                continue
            a = np.stack([scores[ka][s].loc[images].values for s in seeds])
            b = np.stack([scores[kb][s].loc[images].values for s in seeds])
            diff, low, high = paired_bootstrap(a, b)
            rows.append({"dataset": dataset, "a": f"{ka[0]} / {ka[1]}", "b": f"{kb[0]} / {kb[1]}",
                         "seeds": len(seeds), "images": len(images), "diff": diff, "low": low, "high": high,
                         "verdict": verdict(low, high)})
    return pd.DataFrame(rows, columns=["dataset", "a", "b", "seeds", "images", "diff", "low", "high", "verdict"])


def _pair(diffs: pd.DataFrame, dataset: str, a: str, b: str) -> tuple[float, float, float, int, int] | None:
    """(A - B, low, high, seeds, images) from the table, whichever way round it was stored."""
    for x, y, sign in ((a, b, 1), (b, a, -1)):
        hit = diffs[(diffs.dataset == dataset) & (diffs.a == x) & (diffs.b == y)]
        if len(hit):
            r = hit.iloc[0]
            lo, hi = sorted((sign * r["low"], sign * r["high"]))
            return sign * r["diff"], lo, hi, int(r.seeds), int(r.images)
    return None


def _points(diff: float, low: float, high: float) -> str:
    """+6.2 [-12.5, +31.2]: a difference in points and its 95% interval (+ 0.0 turns -0.0 into 0.0)."""
    return f"{100 * diff + 0.0:+.1f} [{100 * low + 0.0:+.1f}, {100 * high + 0.0:+.1f}]"


def noise_words(summary: pd.DataFrame, diffs: pd.DataFrame, dataset: str) -> str:
    """The comparison in plain words: which gaps are larger than the noise, which are not."""
    ok = summary[(summary.dataset == dataset) & (summary.status == "ok")].sort_values(
        "headline_acc_mean", ascending=False, kind="stable")
    pairs = diffs[diffs.dataset == dataset]
    if len(ok) < 2 or pairs.empty:
        return ""
    name = {i: f"{r.experiment} / {r.backbone}" for i, r in ok.iterrows()}
    top = ok.index[0]
    images, seeds = int(pairs.images.max()), int(pairs.seeds.max())
    lines = [f"**Which differences are real ({page_text(dataset)}).** The headline is scored on {images} images, "
             f"so one image is {100 / images:.2f} points. For each pair of recipes, {DRAWS:,} bootstrap draws "
             f"resampled the seeds both ran (up to {seeds}; paired by seed) and the images (paired by image); a "
             f"difference counts only when its 95% interval leaves out 0. Below, each figure is a difference in "
             f"accuracy in points, with its 95% interval in brackets (`differences.csv` has every pair).", ""]
    beats, ties, apart = [], [], []
    for i in ok.index[1:]:
        pair = _pair(diffs, dataset, name[top], name[i])
        if pair is None:
            apart.append(name[i])
        else:
            (beats if pair[1] > 0 else ties).append(f"{name[i]} {_points(*pair[:3])}")
    lines.append(f"- Highest headline: **{name[top]}**, {100 * ok.loc[top, 'headline_acc_mean']:.1f}%.")
    if beats:
        lines.append(f"- It beats, by more than the noise (its accuracy minus theirs): {'; '.join(beats)}.")
    if ties:
        lines.append(f"- Within noise of it, so not shown to be worse (its accuracy minus theirs): {'; '.join(ties)}.")
    if apart:
        lines.append(f"- Not compared with it (no seed in common): {'; '.join(apart)}.")
    for backbone in ok.backbone.unique():
        scratch = ok[(ok.experiment == "resnet_scratch") & (ok.backbone == backbone)]
        if not len(scratch):
            continue
        words = []
        for i, r in ok[(ok.backbone == backbone) & (ok.experiment != "resnet_scratch")].iterrows():
            pair = _pair(diffs, dataset, name[i], name[scratch.index[0]])
            if pair is not None:
                better = "better" if pair[1] > 0 else "worse" if pair[2] < 0 else "within noise"
                words.append(f"{r.experiment} {_points(*pair[:3])}, {better}")
        if words:
            lines.append(f"- Against training {backbone} from scratch (recipe minus scratch): {'; '.join(words)}.")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- beyond accuracy
BALANCE = {"headline_macro_f1": "macro_f1", "headline_balanced_acc": "balanced_accuracy"}  # column: report key


def with_class_balance(out: Path, summary: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """`summary` with the headline model's macro-F1 and balanced accuracy beside its accuracy
    (`headline_macro_f1_mean`/`_std`, `headline_balanced_acc_mean`/`_std`: mean and sample std
    over seeds, as for the accuracy), computed from each ok run's per-image predictions in
    `out/predictions/` (tl/engine/metrics.py): no run is trained again. A row whose runs left
    no predictions gets empty cells."""
    from tl.engine.metrics import report_of_predictions

    values: dict[str, list] = {f"{c}_{s}": [] for c in BALANCE for s in ("mean", "std")}
    for r in summary.itertuples():
        ok = runs[(runs.dataset == r.dataset) & (runs.experiment == r.experiment) & (runs.backbone == r.backbone)
                  & (runs.status == "ok")] if len(runs) else runs
        files = [out / "predictions" / r.dataset / f"{run}.csv" for run in getattr(ok, "run", [])]
        reports = [report_of_predictions(f) for f in files if f.is_file()]
        for column, key in BALANCE.items():
            per_seed = pd.Series([rep[key] for rep in reports], dtype=float)
            values[f"{column}_mean"].append(per_seed.mean() if len(per_seed) else np.nan)
            values[f"{column}_std"].append(per_seed.std() if len(per_seed) > 1 else np.nan)
    summary = summary.drop(columns=[c for c in values if c in summary.columns])
    at = list(summary.columns).index("headline_acc_std") + 1 if "headline_acc_std" in summary.columns \
        else len(summary.columns)
    for i, (column, column_values) in enumerate(values.items()):
        summary.insert(at + i, column, column_values)
    return summary


# ----------------------------------------------------------------------------- tables and paragraphs
def _text(x, default: str = "") -> str:
    return default if x is None or (isinstance(x, float) and pd.isna(x)) else page_text(x)


def _pct(x) -> str:
    return "" if pd.isna(x) else f"{100 * x:.1f}"


def _acc(mean, std, bold: bool = False) -> str:
    if pd.isna(mean):
        return ""
    text = f"{100 * mean:.1f} ± {100 * std:.1f}" if not pd.isna(std) else f"{100 * mean:.1f}"
    return f"**{text}**" if bold else text


def table(summary: pd.DataFrame) -> str:
    """The comparison, headline first; best val is shown but labelled as selected on val."""
    head = ("| data | experiment | backbone | weights | trainable / total params | epochs | **headline acc %** "
            "| headline macro-F1 % | headline balanced acc % "
            "| headline is | best val acc % (selected on val) | final val acc % | epoch-0 val acc % | seeds "
            "| train s | status |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for _, r in summary.iterrows():
        params = (f"{int(r.trainable_params):,} / {int(r.total_params):,}"
                  if not pd.isna(r.trainable_params) else "")
        status = r.status if r.status == "ok" else page_text(f"{r.status}: {r.reason}")
        lines.append(
            f"| {page_text(r.dataset)} | {r.experiment} | {r.backbone} | {r.weights} | {params} | {r.train_epochs} "
            f"| {_acc(r.headline_acc_mean, r.headline_acc_std, bold=True)} "
            f"| {_acc(r.get('headline_macro_f1_mean'), r.get('headline_macro_f1_std'))} "
            f"| {_acc(r.get('headline_balanced_acc_mean'), r.get('headline_balanced_acc_std'))} | {_text(r.headline)} "
            f"| {_acc(r.best_val_acc_mean, r.best_val_acc_std)} | {_acc(r.final_val_acc_mean, r.final_val_acc_std)} "
            f"| {_pct(r.baseline_val_acc_mean)} | {r.seeds} "
            f"| {'' if pd.isna(r.train_seconds_mean) else f'{r.train_seconds_mean:.0f}'} | {status} |")
    return "\n".join(lines)


def details(summary: pd.DataFrame) -> str:
    head = "| data | experiment | backbone | batch | optimizer, lr | best epoch | train img/s | feature cache |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for _, r in summary[summary.status != "not run"].iterrows():
        lines.append(
            f"| {page_text(r.dataset)} | {r.experiment} | {r.backbone} | {r.batch_size} "
            f"| {_text(r.optimizer)} {r.learning_rates} "
            f"| {'' if pd.isna(r.best_epoch_mean) else f'{r.best_epoch_mean:.1f}'} "
            f"| {'' if pd.isna(r.train_images_per_s_mean) else f'{r.train_images_per_s_mean:.1f}'} "
            f"| {_text(r.get('feature_cache'), 'off')} |")
    return "\n".join(lines)


def paragraph(r: pd.Series, summary: pd.DataFrame) -> str:
    text = f"**{r.experiment}** on {r.backbone}, {page_text(r.dataset)} ({r.source}). {note(r.experiment)} "
    if r.status != "ok":
        return text + f"Not run here: {page_text(r.reason)}"
    if flag := _epochs_flag(r.experiment, r.train_epochs):  # the note above describes the recipe's own schedule
        text += (f"This row ran {_epochs(r.train_epochs)} (`{flag.strip()}`), not the recipe's "
                 f"{_own_epochs(r.experiment)}. ")
    text += (f"Headline ({r.headline}): {_acc(r.headline_acc_mean, r.headline_acc_std)}% (mean ± std over "
             f"{r.seeds} seed(s)), from {_pct(r.baseline_val_acc_mean)}% on val before training (epoch 0). "
             f"The best val epoch, selected on val and so flattered by it, averaged "
             f"{_acc(r.best_val_acc_mean, r.best_val_acc_std)}% at epoch {r.best_epoch_mean:.1f}; "
             f"{int(r.trainable_params):,} of {int(r.total_params):,} parameters trained, "
             f"{r.train_seconds_mean:.0f} s of training at {r.train_images_per_s_mean:.1f} images/s.")
    scratch = summary[(summary.dataset == r.dataset) & (summary.experiment == "resnet_scratch")
                      & (summary.backbone == r.backbone) & (summary.status == "ok")]
    if r.experiment != "resnet_scratch" and len(scratch):
        diff = r.headline_acc_mean - scratch.headline_acc_mean.iloc[0]
        text += (f" Against training the same backbone from scratch ({_pct(scratch.headline_acc_mean.iloc[0])}%),"
                 f" that is {100 * diff:+.1f} points.")
    return text


def provenance(meta: dict) -> list[str]:
    """Per data set: the commands its rows come from, and whether that is the full comparison."""
    lines = []
    for dataset, info in meta.get("datasets", {}).items():
        commands = info.get("commands", [])
        if any(c.get("quick") for c in commands):
            kind = "**--quick smoke run, not a result**"
        elif len(commands) == 1 and commands[0].get("full"):
            kind = "full comparison"
        else:
            kind = "**not a full comparison**: rows come from the commands below, some on a subset of the recipes"
        lines.append(f"- {page_text(dataset)} ({page_code(info.get('data', '?'))}): {kind}")
        for i, c in enumerate(commands):
            later = {pair for d in commands[i + 1:] for pair in _pairs(d)}
            rerun = [f"{e} / {b}" for e, b in _pairs(c) if (e, b) in later]
            since = f" (since rerun by a later command: {', '.join(rerun)})" if rerun else ""
            lines.append(f"  - {page_code(c.get('command', '?'))}: {', '.join(c.get('experiments', []))}{since}; "
                         f"commit {c.get('commit', '?')}, {c.get('date', '?')}, {c.get('minutes', '?')} min for this "
                         f"data set ({c.get('command_minutes', '?')} min for the whole command)")
    return lines


def _pairs(command: dict) -> list[tuple[str, str]]:
    """The (recipe, backbone) rows one recorded compare_all command made: as it recorded them, or, in a
    record older than its "rows", each recipe on each backbone asked for, `own` being the recipe's own."""
    from experiments import get_experiment

    if "rows" in command:
        return [tuple(row) for row in command["rows"]]

    def own(recipe: str) -> str:  # a tuned recipe's own was its tuned file's backbone then, which is not recorded
        return "own" if "tuned_" in recipe else get_experiment(recipe).RECIPE.backbone

    return [(e, own(e) if b == "own" else b)
            for e in command.get("experiments", []) for b in command.get("backbones", [])]


class ReportError(Exception):
    pass


def load(out: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    if not (out / "summary.csv").is_file():
        raise ReportError(f"{out / 'summary.csv'} not found: run python -m experiments.compare_all first "
                          f"(or name the folder it wrote)")
    summary = read_table(out / "summary.csv")
    if "headline_acc_mean" not in summary.columns:
        raise ReportError(f"{out / 'summary.csv'} predates headline numbers: rerun python -m experiments.compare_all")
    runs = read_table(out / "runs.csv") if (out / "runs.csv").is_file() else pd.DataFrame(columns=["dataset"])
    meta = json.loads((out / "meta.json").read_text()) if (out / "meta.json").is_file() else {}
    return with_class_balance(out, summary, runs), runs, meta


def write_report(out: str | Path) -> Path:
    out = Path(out)
    summary, runs, meta = load(out)
    write_table(out / "summary.csv", summary)  # with the macro-F1 and balanced accuracy columns
    diffs = differences(out, summary, runs)
    write_table(out / "differences.csv", diffs)
    plots = [p.name for p in sorted(out.glob("*.png"))]
    parts = [
        "# Results (generated by `python -m experiments.report` from summary.csv; do not edit by hand)",
        "",
        f"- machine: {meta.get('machine', '?')}",
        *provenance(meta),
        *([f"- note: {meta['note']}"] if meta.get("note") else []),  # a caveat added by hand to meta.json
        "",
        "**Headline accuracy** is never chosen on the images it is scored on: with a test split, the epoch is",
        "chosen on val (best.pth) and that model is scored on test; without one, it is the final epoch's val",
        "accuracy (the epoch counts come from the documents). In %, mean ± sample std over seeds. Beside it, the",
        "same model's macro-F1 and balanced accuracy (mean recall over classes), from its per-image predictions",
        "(`predictions/`): on unbalanced classes they show what accuracy hides. *best val* is",
        "the maximum over epochs on val, selected on the same images, so optimistic; *epoch-0* is the untrained",
        "baseline (the loop validates before the first update). Raw per-seed figures: `runs.csv`; per-epoch rows:",
        "`history/`; per-image predictions of each headline model: `predictions/`.",
        "",
        table(summary),
        "",
    ]
    for dataset in summary.dataset.unique():
        if words := noise_words(summary, diffs, dataset):
            parts += [words]
    parts += ["## Details", "", details(summary), "", "## What the numbers show", ""]
    parts += [paragraph(r, summary) + "\n" for _, r in summary.iterrows()]
    if plots:
        parts += ["## Plots", ""] + [f"![{page_text(p)}]({quote(p)})" for p in plots] + [""]  # quote: a file name as
        # a link (a space, a | or a line feed in a data folder's name percent-encoded)
    from tl.engine.files import atomic_write_text

    return atomic_write_text(out / "README.md", "\n".join(parts))


def _replace_block(path: Path, name: str, body) -> bool:
    """Replace the text between `<!-- NAME:start -->` and `<!-- NAME:end -->` in `path` with
    `body()` (called only when the markers are there). Returns False if they are not."""
    text = path.read_text()
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    from tl.engine.files import atomic_write_text

    atomic_write_text(path, f"{head}{start}\n{body().rstrip()}\n{end}{rest.split(end, 1)[1]}")
    return True


def _differences(results: Path, summary: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    return read_table(results / "differences.csv") if (results / "differences.csv").is_file() \
        else differences(results, summary, runs)


def update_which_recipe(path: str | Path, results: str | Path) -> bool:
    """Replace the README's "which recipe" block (between `<!-- which-recipe:start -->` and
    `<!-- which-recipe:end -->`) with `which_recipe` of the committed results."""
    results = Path(results)

    def body() -> str:
        summary, runs, _ = load(results)
        return which_recipe(summary, _differences(results, summary, runs))

    return _replace_block(Path(path), "which-recipe", body)


def update_block(path: str | Path, results: str | Path, paragraphs: bool = False) -> bool:
    """Replace the text between `<!-- results:start -->` and `<!-- results:end -->` in `path`
    with the table and the noise statement (or the per-recipe paragraphs) from `results/`.
    Returns False if the file has no such markers."""
    results = Path(results)

    def body() -> str:
        summary, runs, meta = load(results)
        if paragraphs:
            text = "\n".join(paragraph(r, summary) + "\n" for _, r in summary.iterrows())
        else:
            diffs = _differences(results, summary, runs)
            text = "\n".join([table(summary), ""] + [noise_words(summary, diffs, d) for d in summary.dataset.unique()])
        return "\n".join(provenance(meta)) + f"\n\n{text.rstrip()}"

    return _replace_block(Path(path), "results", body)


DATA_COMMAND = {  # how each committed data set is named on a command line, online and offline
    "hymenoptera_data": ("", " --data ../shared/data/hymenoptera_data"),
    "dogs-vs-cats": (" --data data/dogs-vs-cats", " --data data/dogs-vs-cats"),
}
PREPARE = {"dogs-vs-cats": "python main.py --prepare dogs-vs-cats --src ../shared/data/dogs-vs-cats-subset/train "
                           "--dest data/dogs-vs-cats  # once: Kaggle's flat folder split into train/val/test"}


def which_recipe(summary: pd.DataFrame, diffs: pd.DataFrame) -> str:
    """The README's short answer, from the committed results: per data set, the most accurate
    recipe, and the cheapest of those the paired bootstrap cannot tell from it. Cost is the
    training images a run pushes through per second of its measured throughput (epochs / img/s),
    not wall time taken on a shared machine. Tuned recipes (tuned_*) are left out: they are tuned
    for one data set."""
    lines = ["| data set | most accurate | cheapest within its noise |", "|---|---|---|"]
    commands, shortened = [], {}  # shortened: the data sets whose commands need --epochs, in order
    for dataset, group in summary[summary.status == "ok"].groupby("dataset", sort=False):
        group = group[~group.experiment.str.contains("tuned_")]
        if group.empty:
            continue
        best = group.loc[group.headline_acc_mean.idxmax()]
        name = f"{best.experiment} / {best.backbone}"
        close = diffs[(diffs.dataset == dataset) & (diffs.verdict == "within noise")
                      & ((diffs.a == name) | (diffs.b == name))]
        peers = {row.a if row.b == name else row.b for row in close.itertuples()}
        pool = group[[f"{e} / {b}" in peers | {name} for e, b in zip(group.experiment, group.backbone)]]
        cost = pool.train_epochs / pool.train_images_per_s_mean
        cheap = pool.loc[cost.idxmin()]

        def cell(r):
            two = " (a single-logit head: two classes only)" if _single_logit(r.experiment) else ""
            return (f"`{r.experiment}` ({r.backbone}): {_acc(r.headline_acc_mean, r.headline_acc_std)}%; "
                    f"{_epochs(r.train_epochs)} at "
                    f"{r.train_images_per_s_mean:.0f} img/s, {r.train_seconds_mean:.0f} s of training on "
                    f"this 2-core CPU{two}")

        lines.append(f"| {page_text(dataset)} ({best.headline}) | {cell(best)} | {cell(cheap)} |")
        online, offline = DATA_COMMAND.get(dataset, (" --data DIR", " --data DIR"))
        commands += [f"# {one_line(dataset)}: the most accurate, then the cheaper; online, then offline (this machine)"]
        commands += [PREPARE[dataset]] if dataset in PREPARE else []
        for r, backbone in dict.fromkeys([(best.experiment, best.backbone), (cheap.experiment, cheap.backbone)]):
            row = group[(group.experiment == r) & (group.backbone == backbone)].iloc[0]  # the row named above
            epochs = _epochs_flag(r, row.train_epochs)
            shortened.update({dataset: True} if epochs else {})
            for data in dict.fromkeys([online, offline]):
                commands.append(f"python main.py -e {r} -b {backbone}{data}{epochs}")
    why = (f" ({' and '.join(shortened)} run with `--epochs` other than the recipe's own, to fit this machine)"
           if shortened else "")
    return "\n".join(lines + ["", "The tuned recipes (`tuned_*`) are left out of this answer: their numbers were "
                               "searched for one data set (their rows are in results/README.md).", "",
                               f"The commands that made those rows{why}:", "", "```bash", *commands, "```"])


def _epochs(n) -> str:
    return f"{int(n)} training epoch{'' if int(n) == 1 else 's'}"


def _epochs_flag(experiment: str, epochs) -> str:
    """' --epochs N' when a row trained other than its recipe's own epochs (what retrains it), else ''."""
    own = _own_epochs(experiment)
    return "" if own in (None, int(epochs)) else f" --epochs {int(epochs)}"


def _own_epochs(experiment: str) -> int | None:
    """A recipe's own training epochs (None for a name this checkout does not define)."""
    from experiments import NAMES, get_experiment

    return get_experiment(experiment).RECIPE.train_epochs if experiment in NAMES else None


def _single_logit(experiment: str) -> bool:
    from experiments import NAMES, get_experiment

    return experiment in NAMES and get_experiment(experiment).RECIPE.loss == "bce_logit"


def draw_comparison(out: Path, runs, summary) -> set[Path]:
    """The comparison's pictures, drawn from the tables alone (runs, summary, history/): per data set
    the curves of each recipe, all recipes' val curves, and accuracy against cost."""
    import pandas as pd

    from tl.engine import plots
    from tl.engine.backbones import folder_label

    written: set[Path] = set()
    done = runs[runs.status == "ok"]
    for dataset, runs_ds in done.groupby("dataset", sort=False):
        histories = {}
        for (experiment, backbone), g in runs_ds.groupby(["experiment", "backbone"], sort=False):
            frames = [read_table(out / "history" / dataset / f"{r}.csv").assign(seed=s) for r, s in zip(g.run, g.seed)]
            histories[f"{experiment} / {backbone}"] = df = pd.concat(frames)
            written.add(plots.run_curves(df, out / f"curves_{dataset}_{experiment}_{folder_label(backbone)}.png",
                                         title=f"{dataset}: {experiment} on {backbone} ({len(g)} seed(s))"))
        written.add(plots.compare_curves(histories, out / f"curves_{dataset}.png", title=dataset))
        written.add(plots.comparison_chart(summary[summary.dataset == dataset], out / f"comparison_{dataset}.png",
                                           title=dataset))
    return written


def replot(out: Path) -> list[Path]:
    """Every result picture that the committed tables hold the numbers of: the comparison's
    (runs.csv, summary.csv, history/), the BatchNorm study's and the data-efficiency study's.
    (results/looking/ shows models' maps and features: it needs the run folders, see experiments/look.py.)"""
    from experiments import bn_policy, data_efficiency

    out = Path(out)
    summary, runs, _ = load(out)
    drawn = sorted(draw_comparison(out, runs, summary))
    if (out / "bn_policy.csv").is_file():
        drawn.append(bn_policy.plot(read_table(out / "bn_policy.csv"), out / "bn_policy.png"))
    if (out / "data_efficiency.csv").is_file():
        table = read_table(out / "data_efficiency.csv", text=["images_per_class"])
        numeric = table[table.images_per_class != "all"].iloc[0]
        classes = round(numeric.train_images / float(numeric.images_per_class))
        drawn.append(data_efficiency.plot(table, out / "data_efficiency.png",
                                          f"{table.dataset.iloc[0]}, {table.backbone.iloc[0]}: accuracy against "
                                          f"training images per class", classes))
    return drawn


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="?", type=Path, default=Path("results"),
                   help="the folder compare_all wrote (default: results/)")
    p.add_argument("--replot", action="store_true",
                   help="redraw the result pictures from the committed tables (no training), then the report")
    args = p.parse_args(argv)
    from tl.engine.files import updating

    command = "python -m experiments.report " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        if not args.results.is_dir():
            raise ReportError(f"{args.results} is not a folder: name the folder python -m experiments.compare_all "
                              f"wrote")
        with updating(args.results, command):  # one process at a time (a comparison adding rows waits, or is
            # waited for), and its files all or none
            if args.replot:
                for path in replot(args.results):
                    print(f"redrew {path}")
            written = write_report(args.results)
        print(written)
    except ReportError as exc:
        say_error(str(exc))
        return 2
    root = Path(__file__).resolve().parents[1]
    if args.results.resolve() == root / "results":  # the project's own results: refresh the study pages too
        for page, paragraphs in ((root / "docs" / "GUIDE.md", False), (root / "docs" / "RECIPES.md", True)):
            if update_block(page, args.results, paragraphs):
                print(f"updated the results block in {page.relative_to(root)}")
        if update_which_recipe(root / "README.md", args.results):
            print("updated the README's answer to 'which recipe should I use?'")
    return 0


if __name__ == "__main__":
    from tl.engine.command import command  # the one error: line and exit 2 every command shares

    sys.exit(command(main, outputs="the folder given as RESULTS"))
