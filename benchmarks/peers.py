"""Peers side by side: what fastai gets on the same work as the project's recipes.

    python -m benchmarks.peers --data ../shared/data/hymenoptera_data --seeds 0 1 2 --out results
    python -m benchmarks.peers --data data/dogs-vs-cats --rows fastai_default --seeds 0 1 2 --out results
    python -m benchmarks.peers --data ../shared/data/hymenoptera_data --speed --out results
    python -m benchmarks.peers --page-only --out results

fastai is not part of the main install: it comes from requirements-peers.txt, in a virtual
environment of its own (README, Setup). Everything but the training itself (the page, the table,
the picture) runs without it.

What fastai is given, so that only the training procedure differs:

* the same network and weights: the project's `build_model("efficientnet_lite0", classes)`, the
  call every run of compare_all makes (the packaged ImageNet weights, a new Linear head), handed
  to fastai's `Learner(dls, model, splitter=..., metrics=accuracy)` as its docs show for a
  custom model. `vision_learner` would cut the network and put fastai's own head on it
  (concat pooling, BatchNorm, dropout, two Linear layers): another network. The splitter makes
  fastai's two parameter groups of a timm model under vision_learner: the body, everything
  up to the pooled features, and the head (the classifier), so `freeze` and the discriminative
  rates of `fine_tune` act as they would there. Before the first epoch the script checks that
  every tensor fastai trains from is identical to those of a model built by the project's call
  with the same seed, and stops otherwise.
* the same normalisation: `Normalize.from_stats` with the backbone's own mean and std (Lite0's
  weights expect inputs scaled to [-1, 1]), checked to be the one Normalize of the batch pipeline.
* the same images: the project's choice of them (tl.engine.selection.select_images), train/ for
  training and val/ as fastai's validation set (the folder split, GrandparentSplitter).
* fastai's own pipeline, as in the fastai book: presizing, `Resize(460)` per item, then
  `aug_transforms(size=224, min_scale=0.75)` per batch; batch size 64 (fastai's default, whose
  training loader drops the last partial batch).

Rows: `fastai_default` is `learn.fine_tune(epochs - 1)` at its documented default rate
(base_lr 2e-3, one frozen epoch first, so --epochs epochs in all: 12, modern_finetune's budget);
`fastai_lr_find` is the same with `lr_find`'s suggestion (valley) as base_lr, found on the
frozen model as the book does. A fastai run is scored at its final epoch (fastai chooses no
epoch on val): on val where the data folder has no test/ split, else on test/ (every row says
which). Each seed starts from fastai's `set_seed(seed, reproducible=True)`.

The project's rows (modern_finetune, tutorial_finetune, tutorial_frozen, two_stage on
efficientnet_lite0) are read from `--out`/runs.csv and `--out`/predictions/, as compare_all wrote
them, and are trained here only with --with-project (which runs compare_all for them). The paired
bootstrap (experiments/common.paired_bootstrap) compares rows on the seeds and images they share.

Files under --out:

    peers/<data>/<row>-efficientnet_lite0-seed<k>.json     one finished fastai run (seed, accuracy,
                                                           each epoch's seconds and scores, versions)
    peers/<data>/<row>-efficientnet_lite0-seed<k>.predictions.csv   per image: path, label, prediction
    peers/<data>/speed.json                                 --speed: seconds per epoch side by side
    peers.csv, peers.md, peers.png                          the page, drawn from all of the above

Each finished (row, seed) is written at once, its record last, and a rerun skips it: a long
series (an hour a run on dogs-vs-cats on a 2-core CPU) can stop and go on. The page is redrawn
at the end of every invocation from every record there is.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks import at_least, command
from tl.engine import folders
from tl.engine.files import writable_folder
from tl.engine.tables import page_text

BACKBONE = "efficientnet_lite0"
WEIGHTS = "imagenet"  # build_model's weights: for Lite0 the packaged ImageNet weights, as in compare_all's runs
FASTAI_ROWS = ("fastai_default", "fastai_lr_find")
PROJECT_ROWS = ("modern_finetune", "two_stage", "tutorial_finetune", "tutorial_frozen")
REFERENCE = "modern_finetune"  # every other row is compared with it; the fastai rows with two_stage too
BATCH = 64  # fastai's default batch size
PRESIZE, SIZE, MIN_SCALE = 460, 224, 0.75  # the fastai book's presizing
DEFAULT_LR = 2e-3  # fine_tune's base_lr
INSTALL = "pip install -r requirements-peers.txt in a virtual environment of its own (README, Setup)"


# ----------------------------------------------------------------------------- where records live
def run_label(row: str, seed: int) -> str:
    return f"{row}-{BACKBONE}-seed{seed}"


def record_path(out: Path, dataset: str, row: str, seed: int) -> Path:
    return out / "peers" / dataset / f"{run_label(row, seed)}.json"


def predictions_path(record: Path) -> Path:
    return record.with_name(record.name.removesuffix(".json") + ".predictions.csv")


def read_json(path: Path) -> dict:
    from tl import TLError

    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise TLError(f"{path} is not a record this script wrote ({exc}): remove it and run that row again") from exc


def read_records(out: Path) -> list[dict]:
    """Every finished fastai run under out/peers/, in (data set, row, seed) order."""
    records = [read_json(p) for p in sorted((out / "peers").glob("*/*-seed*.json"))]
    return sorted(records, key=lambda r: (r["dataset"], FASTAI_ROWS.index(r["row"]) if r["row"] in FASTAI_ROWS
                                          else len(FASTAI_ROWS), r["row"], r["seed"]))


def correct(predictions: Path):
    """Per image 1 (right) or 0, indexed by the image's path inside the data folder."""
    import pandas as pd

    from tl.engine.tables import read_table

    p = read_table(predictions, text=("path", "label", "prediction"))
    return pd.Series((p.label == p.prediction).astype(int).values, index=p.path)


# ----------------------------------------------------------------------------- the rows of the page
def project_rows(out: Path, dataset: str) -> list[dict]:
    """The project's rows of one data set, one per ok run, from out/runs.csv (compare_all's), with
    their per-image correctness from out/predictions/ and seconds per epoch from out/history/."""
    from tl.engine.tables import read_table

    runs_csv = out / "runs.csv"
    if not runs_csv.is_file():
        return []
    runs = read_table(runs_csv)
    ok = runs[(runs.dataset == dataset) & (runs.backbone == BACKBONE) & runs.experiment.isin(PROJECT_ROWS)
              & (runs.status == "ok")]
    rows = []
    for r in ok.itertuples():
        predictions, history = (out / folder / dataset / f"{r.run}.csv" for folder in ("predictions", "history"))
        rows.append({"dataset": dataset, "row": r.experiment, "peer": "this project", "seed": int(r.seed),
                     "epochs": int(r.train_epochs), "batch_size": int(r.batch_size), "scored": r.headline,
                     "accuracy": float(r.headline_acc), "seconds_per_epoch": epoch_seconds(history),
                     "correct": correct(predictions) if predictions.is_file() else None})
    return rows


def epoch_seconds(history: Path) -> float | None:
    """Mean seconds of one training epoch in a run's history.csv: its train pass and its val
    pass, as fastai's epoch is timed (the untrained model's val pass, epoch 0, left out)."""
    from tl.engine.tables import read_table

    if not history.is_file():
        return None
    h = read_table(history)
    h = h[h.epoch >= 1]
    return float(h.seconds.sum() / h.epoch.nunique()) if len(h) else None


def fastai_rows(out: Path, records: list[dict]) -> list[dict]:
    rows = []
    for r in records:
        predictions = predictions_path(record_path(out, r["dataset"], r["row"], r["seed"]))
        rows.append({k: r[k] for k in ("dataset", "row", "seed", "epochs", "batch_size", "scored", "accuracy")}
                    | {"peer": f"fastai {r['versions']['fastai']}", "seconds_per_epoch": r["seconds_per_epoch"],
                       "correct": correct(predictions) if predictions.is_file() else None})
    return rows


def verdict(a: str, b: str, low: float, high: float) -> str:
    """What the paired bootstrap's 95% interval of A - B says, in the rows' names."""
    return f"{a} beats {b}" if low > 0 else f"{b} beats {a}" if high < 0 else "within noise"


def compare(runs: list[dict], a: str, b: str) -> dict | None:
    """Row A against row B of one data set's runs: the paired bootstrap on the seeds both ran and
    the images both scored (None where they share none)."""
    import numpy as np

    from experiments.common import paired_bootstrap

    scores = {name: {r["seed"]: r["correct"] for r in runs if r["row"] == name and r["correct"] is not None}
              for name in (a, b)}
    seeds = sorted(set(scores[a]) & set(scores[b]))
    if not seeds:
        return None
    images = sorted(set.intersection(*(set(scores[n][s].index) for n in (a, b) for s in seeds)))
    if not images:
        return None
    x, y = (np.stack([scores[n][s].loc[images].values for s in seeds]) for n in (a, b))
    diff, low, high = paired_bootstrap(x, y)
    return {"a": a, "b": b, "seeds": len(seeds), "images": len(images), "diff": diff, "low": low, "high": high,
            "verdict": verdict(a, b, low, high)}


def _order(row: str) -> int:
    return (FASTAI_ROWS + PROJECT_ROWS).index(row) if row in FASTAI_ROWS + PROJECT_ROWS else 99


def summary(runs: list[dict]) -> tuple[list[dict], list[dict]]:
    """(one row per data set x row: mean ± std over seeds and the comparison with modern_finetune;
    every comparison made: each row with modern_finetune, each fastai row with two_stage)."""
    import statistics

    table, pairs = [], []
    for dataset in sorted({r["dataset"] for r in runs}):
        here = [r for r in runs if r["dataset"] == dataset]
        for name in sorted({r["row"] for r in here}, key=_order):
            mine = sorted((r for r in here if r["row"] == name), key=lambda r: r["seed"])
            accs = [r["accuracy"] for r in mine]
            secs = [r["seconds_per_epoch"] for r in mine if r["seconds_per_epoch"] is not None]
            versus = [b for b in (REFERENCE, "two_stage") if b != name and (b == REFERENCE or name in FASTAI_ROWS)]
            found = [c | {"dataset": dataset} for b in versus if (c := compare(here, name, b))]
            pairs += found
            ref = next((c for c in found if c["b"] == REFERENCE), {})
            table.append({"dataset": dataset, "row": name, "peer": mine[0]["peer"], "epochs": mine[0]["epochs"],
                          "batch_size": mine[0]["batch_size"], "scored": mine[0]["scored"],
                          "seeds": " ".join(str(r["seed"]) for r in mine), "runs": len(mine),
                          "accuracy_mean": statistics.mean(accs),
                          "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else None,
                          "accuracies": " ".join(f"{a:.4f}" for a in accs),
                          "seconds_per_epoch": statistics.mean(secs) if secs else None,
                          **{f"{k}_vs_{REFERENCE}": ref.get(k) for k in ("diff", "low", "high", "verdict")}})
    return table, pairs


# ----------------------------------------------------------------------------- the page
def _pct(x) -> str:
    return "" if x is None or x != x else f"{100 * x:.1f}"


def _facts(records: list[dict]) -> list[str]:
    """What every fastai run was given and ran on, each different value listed."""
    def values(get) -> str:
        return ", ".join(sorted({str(get(r)) for r in records}))

    return [
        f"- versions: fastai {values(lambda r: r['versions']['fastai'])}, fastcore "
        f"{values(lambda r: r['versions']['fastcore'])}, torch {values(lambda r: r['versions']['torch'])}, "
        f"torchvision {values(lambda r: r['versions']['torchvision'])}, timm {values(lambda r: r['versions']['timm'])}",
        f"- the network: {values(lambda r: r['checks']['network'])}",
        f"- normalisation: {values(lambda r: r['checks']['normalisation'])}",
        f"- machine: {values(lambda r: r['machine'])}; torch threads {values(lambda r: r['threads'])}, "
        f"DataLoader workers {values(lambda r: r['workers'])}, channels_last {values(lambda r: r['channels_last'])}",
        "- base_lr: " + "; ".join(f"{r['row']} seed {r['seed']}: {r['base_lr']:.3g} ({r['lr_source']}"
                                   + (f", found in {r['lr_find_seconds']:.0f} s" if r.get("lr_find_seconds") else "")
                                   + ")" for r in records),
        f"- commits: {values(lambda r: r['commit'])}",
    ]


ADAPTED = [
    f"- **the network**: the project's `build_model(\"{BACKBONE}\", classes)` (packaged ImageNet weights, a new "
    "Linear head), handed to fastai's `Learner(dls, model, splitter=..., metrics=accuracy)`, the way fastai's docs "
    "show for a custom model; `vision_learner` would replace the head with fastai's own (concat pooling, "
    "BatchNorm, dropout, two Linear layers), another network. The splitter gives fastai's two groups of a timm "
    "model: the body (everything up to the pooled features) and the head (the classifier), so `freeze` and the "
    "discriminative rates of `fine_tune` (body at base_lr / 100) act as under vision_learner. Checked before the "
    "first epoch: every tensor identical to a model built by the project's call with the same seed.",
    "- **normalisation**: `Normalize.from_stats` with the backbone's mean and std (Lite0's weights expect "
    "[-1, 1] inputs), checked to be the one Normalize of fastai's batch pipeline.",
    "- **images and val framing**: the project's choice of images (select_images); train/ trains, val/ is "
    "fastai's validation set (the folder split). fastai chooses no epoch on val: a fastai run is scored at its "
    "final epoch, on val where the data folder has no test/ split and on test/ where it has one (the *scored* "
    "column says which, for every row).",
    f"- **fastai's own pipeline and training**: presizing as in the fastai book (`Resize({PRESIZE})` per item, "
    f"`aug_transforms(size={SIZE}, min_scale={MIN_SCALE})` per batch), batch size {BATCH} (fastai's default; its "
    "training loader drops the last partial batch), fastai's Adam, `fine_tune(epochs - 1)`: one frozen epoch "
    "(head and BatchNorm train), then everything, one-cycle each. `fastai_default` at fine_tune's base_lr "
    f"{DEFAULT_LR:g}; `fastai_lr_find` at `lr_find()`'s suggestion (valley) on the frozen model, as the book "
    "does. Seeds: `set_seed(seed, reproducible=True)`.",
]


def page(table: list[dict], pairs: list[dict], records: list[dict], speeds: list[dict]) -> str:
    lines = ["# Peers side by side: fastai on the same work", "",
             "fastai's `fine_tune`, as a practitioner reaches for it, on the same photos, network, weights and "
             "normalisation as the project's recipes (`python -m benchmarks.peers`; fastai from "
             "requirements-peers.txt). The project's rows are compare_all's (runs.csv, predictions/). Accuracy in %, "
             "mean ± sample std over seeds; *s / epoch*: one train pass and one val pass, mean over the epochs. "
             "The paired bootstrap (95% interval of A - B over seeds and images, experiments/common.py) says "
             "which differences are real.", "", "## What fastai was given", "", *ADAPTED]
    if records:
        lines += ["", "As recorded by its runs:", "", *_facts(records)]
    commands = sorted({r["command"] for r in records} | {s["command"] for s in speeds})
    lines += ["", "Commands:", "", *(f"    {c}" for c in commands)]
    for dataset in sorted({r["dataset"] for r in table}):
        lines += ["", f"## {page_text(dataset)}", "",
                  f"| row | peer | epochs | batch | scored | seeds | accuracy % | per seed | "
                  f"s / epoch | vs {REFERENCE}: A - B (95% interval), points | verdict |", "|---" * 11 + "|"]
        for r in (r for r in table if r["dataset"] == dataset):
            std = f" ± {_pct(r['accuracy_std'])}" if r["accuracy_std"] is not None else ""
            vs = (f"{100 * r[f'diff_vs_{REFERENCE}']:+.1f} ({100 * r[f'low_vs_{REFERENCE}']:+.1f}, "
                  f"{100 * r[f'high_vs_{REFERENCE}']:+.1f})" if r[f"diff_vs_{REFERENCE}"] is not None else "")
            secs = f"{r['seconds_per_epoch']:.1f}" if r["seconds_per_epoch"] is not None else ""
            lines.append(f"| {r['row']} | {r['peer']} | {r['epochs']} | {r['batch_size']} | {r['scored']} | "
                         f"{r['seeds']} | {_pct(r['accuracy_mean'])}{std} | "
                         f"{' '.join(_pct(float(a)) for a in r['accuracies'].split())} | {secs} | {vs} | "
                         f"{r[f'verdict_vs_{REFERENCE}'] or ''} |")
        mine = [p for p in pairs if p["dataset"] == dataset]
        if mine:
            lines += ["", "| A | B | seeds | images | A - B, points | 95% interval | verdict |", "|---" * 7 + "|"]
            lines += [f"| {p['a']} | {p['b']} | {p['seeds']} | {p['images']} | {100 * p['diff']:+.1f} | "
                      f"{100 * p['low']:+.1f} to {100 * p['high']:+.1f} | {p['verdict']} |" for p in mine]
    return "\n".join(lines + speed_section(speeds)) + "\n"


def speed_section(speeds: list[dict]) -> list[str]:
    if not speeds:
        return []
    lines = ["", "## Speed side by side", "",
             "Seconds per epoch (one train pass, one val pass) of fastai's `fine_tune` and of the project's "
             f"{REFERENCE}, timed in one invocation on one machine with the same torch threads, DataLoader workers "
             "and memory format; epoch 1 trains the head on the frozen body, epoch 2 everything.", "",
             "| data set | epoch | fastai s | project s | fastai / project | threads | workers | channels_last | "
             "machine |", "|---" * 9 + "|"]
    for s in speeds:
        for e, (f, p) in enumerate(zip(s["fastai_seconds"], s["project_seconds"]), start=1):
            lines.append(f"| {page_text(s['dataset'])} | {e} | {f:.1f} | {p:.1f} | {f / p:.2f} | {s['threads']} | "
                         f"{s['workers']} | {s['channels_last']} | {s['machine']} |")
    return lines


def draw(table: list[dict], path: Path) -> Path:
    """One panel per data set: each row's seeds as dots, their mean as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tl.engine.plots import save_figure

    datasets = sorted({r["dataset"] for r in table})
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 3.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        rows = [r for r in table if r["dataset"] == dataset]
        for y, r in enumerate(rows):
            accs = [100 * float(a) for a in r["accuracies"].split()]
            color = "tab:orange" if r["row"] in FASTAI_ROWS else "tab:blue"
            ax.barh(y, 100 * r["accuracy_mean"], color=color, alpha=0.35)
            ax.plot(accs, [y] * len(accs), "o", color=color)
        ax.set_yticks(range(len(rows)), [f"{r['row']}\n({r['scored']})" for r in rows], fontsize=8)
        low = min(100 * float(a) for r in rows for a in r["accuracies"].split())
        ax.set_xlim(max(0.0, low - 5), 100)
        ax.invert_yaxis()  # the rows top to bottom, as in the table
        ax.set_xlabel("accuracy %")
        ax.set_title(f"{dataset}: fastai (orange) and the project (blue)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def write_page(out: Path) -> list[Path]:
    """peers.csv, peers.md and peers.png in `out`, from every record under out/peers/ and the
    project's rows of the same data sets; nothing is written where there is no fastai record."""
    from tl.engine.files import atomic_write_text, updating
    from tl.engine.tables import write_table

    records = read_records(out)
    if not records:
        return []
    runs = fastai_rows(out, records)
    for dataset in sorted({r["dataset"] for r in records}):
        runs += project_rows(out, dataset)
    table, pairs = summary(runs)
    speeds = [read_json(p) for p in sorted((out / "peers").glob("*/speed.json"))]
    with updating(out, "python -m benchmarks.peers"):  # one process at a time; table, page, picture together
        write_table(out / "peers.csv", table)
        atomic_write_text(out / "peers.md", page(table, pairs, records, speeds))
        draw(table, out / "peers.png")
    return [out / "peers.csv", out / "peers.md", out / "peers.png"]


# ----------------------------------------------------------------------------- fastai's runs
def import_fastai():
    """fastai's vision API, or one error line saying how to install it."""
    from tl import TLError

    try:
        import fastai.vision.all as fv
    except ImportError as exc:
        raise TLError(f"fastai is not importable here ({exc}): {INSTALL}") from exc
    return fv


def project_images(data: Path) -> dict[str, list[Path]]:
    """{phase: image files} as the project's runs choose them (train, val and test where data/test/ is)."""
    from tl.engine.selection import ImageChoice, select_images

    sets = select_images(ImageChoice(data=data), {p: None for p in ("train", "val", "test")})
    return {phase: [Path(path) for path, _ in ds.samples] for phase, ds in sets.items()}


def fastai_data(fv, images: dict[str, list[Path]], spec, workers: int):
    """fastai's DataLoaders of the fastai book's presizing pipeline, on the project's images and
    normalisation, val/ as the validation set."""
    block = fv.DataBlock(blocks=(fv.ImageBlock, fv.CategoryBlock), get_y=fv.parent_label,
                         splitter=fv.GrandparentSplitter(train_name="train", valid_name="val"),
                         item_tfms=fv.Resize(PRESIZE),
                         batch_tfms=[*fv.aug_transforms(size=SIZE, min_scale=MIN_SCALE),
                                     fv.Normalize.from_stats(list(spec.mean), list(spec.std))])
    return block.dataloaders(images["train"] + images["val"], bs=BATCH, num_workers=workers)


def body_and_head(spec):
    """fastai's splitter: [body parameters, head parameters], the head being the backbone's classifier."""
    def split(model):
        head = model.get_submodule(spec.head)
        ids = {id(p) for p in head.parameters()}
        return [[p for p in model.parameters() if id(p) not in ids], list(head.parameters())]

    return split


def project_model(seed: int, classes: int, channels_last: bool = False):
    """The project's network as every compare_all run builds it, its new head drawn from `seed`."""
    import torch

    from tl.engine.weights import build_model

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_model(BACKBONE, classes, WEIGHTS)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def check_network(model, reference) -> str:
    """Every tensor (parameters and BatchNorm buffers) of `model` identical to `reference`'s, or TLError."""
    import torch

    from tl import TLError

    mine, theirs = model.state_dict(), reference.state_dict()
    if list(mine) != list(theirs):
        raise TLError(f"fastai's network has other tensors than the project's: {sorted(set(mine) ^ set(theirs))[:3]}")
    differ = [k for k in mine if not torch.equal(mine[k].cpu(), theirs[k].cpu())]
    if differ:
        raise TLError(f"fastai would train from other weights than the project's: {len(differ)} tensors differ, "
                      f"e.g. {differ[0]}")
    return f"{BACKBONE}, {len(mine)} tensors identical to the project's build_model (seed's head included)"


def check_normalisation(fv, dls, spec) -> str:
    import torch

    from tl import TLError

    norms = [t for t in dls.after_batch.fs if isinstance(t, fv.Normalize)]
    want = [torch.tensor(spec.mean, dtype=torch.float32), torch.tensor(spec.std, dtype=torch.float32)]
    if len(norms) != 1 or not all(torch.equal(t.flatten().cpu().float(), w)
                                  for t, w in zip((norms[0].mean, norms[0].std), want)):
        raise TLError(f"fastai's batch pipeline does not normalise with {BACKBONE}'s mean {spec.mean} and std "
                      f"{spec.std}: {[(n.mean.flatten().tolist(), n.std.flatten().tolist()) for n in norms]}")
    return f"mean {tuple(spec.mean)}, std {tuple(spec.std)}, the one Normalize of the batch pipeline"


def epoch_recorder(fv, check):
    """A fastai callback: `check()` before the first fit trains, then each epoch's wall seconds
    (its train and its val pass) and the Recorder's scores."""
    class EpochRecord(fv.Callback):
        order = fv.Recorder.order + 1  # after the Recorder has this epoch's values

        def __init__(self):
            self.epochs, self.checked = [], None

        def before_fit(self):
            if self.checked is None:
                self.checked = check()

        def before_epoch(self):
            self.start = time.perf_counter()

        def after_epoch(self):
            names = self.recorder.metric_names[1:-1]  # between "epoch" and "time"
            self.epochs.append({"seconds": time.perf_counter() - self.start,
                                **{n: float(v) for n, v in zip(names, self.recorder.values[-1])}})

    return EpochRecord()


def versions() -> dict:
    import importlib

    return {name: importlib.import_module(name).__version__ for name in ("fastai", "fastcore", "torch", "torchvision",
                                                                          "timm")}


def fastai_run(row: str, data: Path, seed: int, epochs: int, settings: dict, log=print) -> tuple[dict, list[dict]]:
    """One fastai run: (its record, its per-image predictions as rows of path, label, prediction)."""
    import tempfile

    from tl.engine.backbones import backbone_spec

    fv = import_fastai()
    spec, images = backbone_spec(BACKBONE), project_images(data)
    fv.set_seed(seed, reproducible=True)
    dls = fastai_data(fv, images, spec, settings["workers"])
    checks = {"normalisation": check_normalisation(fv, dls, spec)}
    with tempfile.TemporaryDirectory() as scratch:  # lr_find saves and restores the weights through a file
        learn = fv.Learner(dls, project_model(seed, len(dls.vocab), settings["channels_last"]),
                           splitter=body_and_head(spec), metrics=fv.accuracy, path=scratch)
        with learn.no_bar():
            base_lr, source, started = DEFAULT_LR, "fine_tune's default", time.perf_counter()
            if row == "fastai_lr_find":  # fastai's 100 batches (fewer if the loss diverges), on the frozen model
                learn.freeze()
                base_lr, source = float(learn.lr_find(show_plot=False).valley), "lr_find's valley"
            lr_find_seconds = time.perf_counter() - started
            record = epoch_recorder(fv, lambda: check_network(learn.model, project_model(seed, len(dls.vocab))))
            log(f"{row} seed {seed}: fine_tune({epochs - 1}, base_lr={base_lr:.3g}) ({source})")
            learn.fine_tune(epochs - 1, base_lr=base_lr, cbs=[record])
            predictions, scored = score(fv, learn, images, data)
    accuracy = sum(p["label"] == p["prediction"] for p in predictions) / len(predictions)
    check_epochs(record.epochs, epochs, accuracy, scored)
    return {"dataset": data.resolve().name, "row": row, "backbone": BACKBONE, "seed": seed, "epochs": epochs,
            "batch_size": BATCH, "base_lr": base_lr, "lr_source": source, "lr_find_seconds": lr_find_seconds,
            "scored": scored, "accuracy": accuracy,
            "images": len(predictions), "seconds_per_epoch": sum(e["seconds"] for e in record.epochs) / epochs,
            "history": record.epochs, "checks": checks | {"network": record.checked}, "versions": versions(),
            **settings}, predictions


def check_epochs(history: list[dict], epochs: int, accuracy: float, scored: str) -> None:
    """The run trained `epochs` epochs, and where it was scored on val, the accuracy of its
    predictions is the one fastai's Recorder gave its final epoch."""
    from tl import TLError

    if len(history) != epochs:
        raise TLError(f"fastai's fine_tune trained {len(history)} epochs, not the {epochs} asked for")
    if scored.startswith("val") and abs(history[-1]["accuracy"] - accuracy) > 1e-6:
        raise TLError(f"the final model's val predictions score {accuracy:.6f}, fastai's Recorder said "
                      f"{history[-1]['accuracy']:.6f} for its final epoch: not the same model or images")


def score(fv, learn, images: dict[str, list[Path]], data: Path) -> tuple[list[dict], str]:
    """The final model's prediction for every image of test/ (where the data folder has one) or
    of val/, as (rows of path, label, prediction; what was scored). Paths are relative to the data
    folder, as in the project's predictions/ files, so the paired bootstrap pairs them."""
    from tl import TLError

    phase = "test" if images.get("test") else "val"
    dl = learn.dls.test_dl(images[phase], with_labels=True) if phase == "test" else learn.dls.valid
    probabilities, targets = learn.get_preds(dl=dl)
    vocab, root = learn.dls.vocab, data.resolve()
    rows = [{"path": Path(item).resolve().relative_to(root).as_posix(), "label": vocab[int(t)],
             "prediction": vocab[int(p)]} for item, t, p in zip(dl.items, targets, probabilities.argmax(1))]
    if len(rows) != len(images[phase]) or any(r["label"] != Path(r["path"]).parent.name for r in rows):
        raise TLError(f"fastai scored {len(rows)} {phase} images with their labels, the project chose "
                      f"{len(images[phase])}: not the same images")
    return rows, f"{phase}, final epoch"


def project_speed(data: Path, seed: int, epochs: int, settings: dict, log=print) -> list[float]:
    """Seconds of each epoch (train pass + val pass) of the project's modern_finetune, trained
    for `epochs` epochs in a scratch folder with the same threads, workers and memory format."""
    import tempfile

    from experiments import get_experiment
    from tl.engine.options import RunOptions
    from tl.engine.run import run
    from tl.engine.tables import read_table

    module = get_experiment(REFERENCE, data)
    with tempfile.TemporaryDirectory() as scratch:
        opts = RunOptions(data=data, backbone=BACKBONE, epochs=epochs, seed=seed, workers=settings["workers"],
                          out=Path(scratch), run_name="speed", progress=False, plots=False,
                          channels_last=settings["channels_last"])
        run(module.RECIPE, module.build, opts, log=lambda line: log("    " + line))
        h = read_table(Path(scratch) / "speed" / "history.csv")
    return [float(h[h.epoch == e].seconds.sum()) for e in range(1, epochs + 1)]


def speed(data: Path, seed: int, epochs: int, settings: dict, out: Path, log=print) -> Path:
    """--speed: `epochs` epochs of each, the project's first, written to out/peers/<data>/speed.json."""
    from tl.engine.files import write_json

    project = project_speed(data, seed, epochs, settings, log)
    record, _ = fastai_run("fastai_default", data, seed, epochs, settings, log)
    path = out / "peers" / record["dataset"] / "speed.json"
    folders.make(path.parent)
    write_json(path, {**settings, "dataset": record["dataset"], "seed": seed, "epochs": epochs,
                      "fastai_seconds": [e["seconds"] for e in record["history"]], "project_seconds": project,
                      "versions": record["versions"]})
    return path


def train_rows(data: Path, rows: list[str], seeds: list[int], epochs: int, settings: dict, out: Path,
               log=print) -> None:
    """Each (row, seed) not yet recorded, its predictions then its record written as soon as it ends."""
    from tl.engine.files import write_json
    from tl.engine.tables import write_table

    dataset = data.resolve().name
    for row in rows:
        for seed in seeds:
            path = record_path(out, dataset, row, seed)
            if path.is_file():
                done = read_json(path)
                log(f"{row} seed {seed}: recorded in {path} ({100 * done['accuracy']:.1f}%), skipped")
                continue
            record, predictions = fastai_run(row, data, seed, epochs, settings, log)
            folders.make(path.parent)
            write_table(predictions_path(path), predictions, columns=["path", "label", "prediction"])
            write_json(path, record)
            log(f"{row} seed {seed}: {100 * record['accuracy']:.1f}% ({record['scored']}), "
                f"{record['seconds_per_epoch']:.1f} s / epoch -> {path}")


def with_project(data: Path, seeds: list[int], out: Path) -> None:
    """--with-project: the project's rows trained by compare_all (its own command, its own tables)."""
    import subprocess

    from tl import TLError

    cmd = [sys.executable, "-m", "experiments.compare_all", "--data", str(data), "--backbone", BACKBONE,
           "--experiments", *PROJECT_ROWS, "--seeds", *map(str, seeds), "--out", str(out)]
    if subprocess.run(cmd).returncode != 0:
        raise TLError(f"the project's rows did not run: {' '.join(cmd)} failed (its error above)")


def run_settings(args: argparse.Namespace, argv: list[str]) -> dict:
    import shlex

    import torch

    from experiments.common import git_commit, machine_description
    from tl.engine.device import default_channels_last

    if args.threads:
        torch.set_num_threads(args.threads)
    channels_last = default_channels_last(torch.device("cpu")) if args.channels_last is None else args.channels_last
    return {"threads": torch.get_num_threads(), "workers": args.workers, "channels_last": channels_last,
            "machine": machine_description(), "commit": git_commit(), "date": time.strftime("%Y-%m-%d"),
            "command": "python -m benchmarks.peers " + shlex.join(argv)}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="a data folder with train/ and val/ (and test/, scored where present)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=at_least(2), default=12,
                   help="epochs in all: one frozen, then epochs - 1 (default 12, modern_finetune's)")
    p.add_argument("--rows", nargs="+", choices=FASTAI_ROWS, default=list(FASTAI_ROWS))
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument("--workers", type=at_least(0), default=2, help="DataLoader workers, both peers (default 2)")
    p.add_argument("--threads", type=at_least(1), help="torch threads (default: torch's own)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory layout (default: the project's choice for the device, on for a CPU)")
    p.add_argument("--speed", action="store_true", help="time --speed-epochs epochs of fastai and of "
                   f"{REFERENCE} side by side instead of training the rows")
    p.add_argument("--speed-epochs", type=at_least(2), default=2)
    p.add_argument("--with-project", action="store_true",
                   help=f"train the project's rows too ({', '.join(PROJECT_ROWS)}) through experiments.compare_all")
    p.add_argument("--page-only", action="store_true", help="redraw peers.csv/md/png from the records, train nothing")
    args = p.parse_args(argv)
    if args.data is None and not args.page_only:
        p.error("--data is required (unless --page-only)")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    out = writable_folder(args.out)
    if not args.page_only:
        import_fastai()  # before anything trains: one line saying how to install it
        settings = run_settings(args, argv)
        if args.with_project:
            with_project(args.data, args.seeds, out)
        if args.speed:
            print(f"-> {speed(args.data, args.seeds[0], args.speed_epochs, settings, out)}")
        else:
            train_rows(args.data, args.rows, args.seeds, args.epochs, settings, out)
    for path in write_page(out):
        print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(command(main))
