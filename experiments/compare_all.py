"""What does transfer learning buy? Every recipe, same data, same loop, side by side.

    python -m experiments.compare_all --data ../shared/data/hymenoptera_data data/dogs-vs-cats \\
        --backbone efficientnet_lite0 own --seeds 0 1 2

runs each data set x recipe x backbone x seed through `tl.engine.run.run` (the one loop) and
writes to `--out` (default `results/`):

    runs.csv                        one row per run (seed): the raw figures
    summary.csv                     one row per data set x recipe x backbone: mean ± std over seeds
    history/<data>/<run>.csv        every run's per-epoch rows, so any figure can be recomputed
    predictions/<data>/<run>.csv    per image: the headline model's prediction (for the paired bootstrap)
    curves_<data>.png               val accuracy and loss per epoch, one line per recipe
    comparison_<data>.png           headline accuracy next to training time
    curves_<data>_<exp>_<bb>.png    train vs val curves of each recipe
    differences.csv                 every pair of recipes: accuracy difference and its 95% interval
    meta.json, README.md            the commands, the machine, and the tables in words (experiments/report.py)

Where experiments/tune.py has left numbers for a data set (experiments/tuned/<recipe>-<data
set>.json), `tuned_<recipe>` is compared on that data set too, trained and scored like every
other recipe: its numbers were chosen on an inner split of train, so val and test are as
unseen for it as for the rest.

The headline number of a run is never chosen on the images it is scored on
(`tl.engine.headline.score_headline`): test accuracy of the epoch chosen on val where the data
folder has a `test/` split, else the final epoch's val accuracy.

Rows are keyed by (data set, recipe, backbone). A run of a subset replaces the rows of the
keys it ran and keeps the others; every table and plot is then redrawn from all rows, and
files of runs that no longer have a row are removed. meta.json records, per data set, the
commands its rows come from and whether they were the full comparison (every recipe, not
--quick). `--backbone own` means each recipe's own architecture (ResNet18, VGG16). A run
that cannot start here, e.g. because ImageNet weights for a torchvision backbone are not on
this machine, becomes a `not run` row with the reason; the others go on.

Two comparisons may run at the same time into one `--out` folder: each trains in its own
runs folder, and the writing (history/ and predictions/ files, the tables, the plots, the
removal of stale files) happens under a lock on `--out/.results.lock` (tl/engine/folder_lock.py).
A comparison that finds the lock taken says which process holds it and waits; it then
merges its rows with the ones the other wrote, so no row and no file is lost.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from experiments import NAMES
from experiments.common import dataset_name, git_commit, machine_description, train_or_reason, unchanged
from tl.engine import folders
from tl.engine.command import say_error

# torch, pandas and tl are imported inside the functions that need them, so that
# `--help` and argument errors answer at once instead of after seconds of imports.

KEY = ["dataset", "experiment", "backbone"]  # one summary row, one set of seeds
RUN_COLUMNS = [
    "dataset", "experiment", "source", "backbone", "weights", "strategy", "seed", "status", "reason",
    "trainable_params", "total_params", "train_epochs", "batch_size", "optimizer", "learning_rates",
    "headline", "headline_acc", "test_acc",
    "baseline_val_acc", "best_val_acc", "best_epoch", "final_val_acc", "final_val_loss",
    "train_seconds", "train_images_per_s", "feature_cache", "device", "torch", "quick", "date", "run",
]
MEAN_STD = ["headline_acc", "best_val_acc", "final_val_acc"]  # reported as mean and std over seeds
MEAN_ONLY = ["baseline_val_acc", "best_epoch", "train_seconds", "train_images_per_s"]
CONSTANT = ["source", "weights", "strategy", "trainable_params", "total_params", "train_epochs",
            "batch_size", "optimizer", "learning_rates", "feature_cache", "device", "torch", "headline", "quick"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.compare_all", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", nargs="+", action="extend", metavar="DIR",
                   help="data folder(s), each compared separately; repeat or list several "
                        "(default: $TL_DATA_DIR or data/hymenoptera_data)")
    p.add_argument("--backbone", nargs="+", default=["own"],
                   help="backbone(s) for every recipe; 'own' = each recipe's default (default: own)")
    p.add_argument("--experiments", nargs="+", metavar="NAME",
                   help="a subset of recipes (default: all, and tuned_<recipe> where experiments/tune.py left "
                        "numbers for the data set)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="repeat each run with these seeds")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars for the long passes of each run (feature passes, scans)")
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
    args.with_tuned = args.experiments is None
    args.experiments = args.experiments or list(NAMES)
    for name in args.experiments:
        if name.removeprefix("tuned_") not in NAMES:
            p.error(f"unknown experiment {name!r}; choose from {', '.join(NAMES)}, or tuned_<one of them>")
    if args.epochs is not None and args.epochs < 1:
        p.error("--epochs must be at least 1")
    return args


def plan_of(data_dirs: list[Path], args: argparse.Namespace) -> list[tuple[Path, str, str, int]]:
    """(data folder, recipe, backbone, seed) of every run. A tuned recipe runs only on a backbone
    with numbers tuned for it: one added by --with-tuned is left out elsewhere, one asked for by
    name is refused (a TLError) before anything trains."""
    from experiments import get_experiment
    from tl import TLError

    plan = []
    for d in data_dirs:
        for e in experiments_for(d, args):
            for b in args.backbone:
                if e.startswith("tuned_"):
                    try:
                        get_experiment(e, d, None if b == "own" else b)
                    except TLError:
                        if e in args.experiments:
                            raise
                        continue
                plan += [(d, e, b, s) for s in args.seeds]
    return plan


def row_backbone(recipe: str, data_dir: Path, backbone: str) -> str:
    """The backbone column of the row that `recipe` on --backbone `backbone` makes (run_one): the
    backbone as given, or for `own` the recipe's own network (a tuned recipe's: its tuned file's)."""
    from experiments import get_experiment

    return backbone if backbone != "own" else get_experiment(recipe, data_dir, None).RECIPE.backbone


def experiments_for(data_dir: Path, args: argparse.Namespace) -> list[str]:
    """The recipes compared on one data set: those asked for, and by default each tuned_<recipe>
    whose numbers were tuned on this data set (experiments/tune.py), trained like any other."""
    from experiments import tuned_files

    dataset = dataset_name(data_dir)
    tuned = [f"tuned_{n}" for n in NAMES if args.with_tuned and any(d == dataset for d, _ in tuned_files(n))]
    return [*args.experiments, *(t for t in tuned if t not in args.experiments)]


def _order(name: str) -> float:
    """Recipe order in the tables: the registry's, a tuned recipe right after its base."""
    base = name.removeprefix("tuned_")
    return NAMES.index(base) + (0.5 if base != name else 0) if base in NAMES else len(NAMES)


def run_one(name: str, backbone: str, seed: int, data_dir: Path, args: argparse.Namespace, runs_dir: Path,
            log) -> tuple[dict, object]:
    """One data set x recipe x backbone x seed -> (one row of runs.csv (status ok / not run /
    failed), the finished run or None). Ctrl-C (tl.Interrupted) is not a row: it stops the
    whole comparison."""
    import torch

    from experiments import get_experiment
    from tl.engine.backbones import folder_label
    from tl.engine.options import RunOptions, resolve

    module = get_experiment(name, data_dir, None if backbone == "own" else backbone)
    dataset = dataset_name(data_dir)
    opts = RunOptions(data=data_dir, backbone=None if backbone == "own" else backbone, epochs=args.epochs,
                      seed=seed, workers=args.workers, device=args.device, out=runs_dir / dataset,
                      progress=args.progress, plots=False)
    if args.quick:
        opts.make_quick()
    recipe = resolve(module.RECIPE, opts)
    label = f"{name}-{folder_label(recipe.backbone)}-seed{seed}"  # timm:NAME -> timm-NAME
    opts.run_name = label
    row = {"dataset": dataset, "experiment": name, "source": recipe.source, "backbone": recipe.backbone,
           "strategy": recipe.strategy, "seed": seed, "train_epochs": recipe.train_epochs,
           "batch_size": recipe.batch_size, "weights": recipe.weights, "learning_rates": _recipe_lrs(recipe),
           "torch": torch.__version__, "quick": args.quick, "date": time.strftime("%Y-%m-%d"), "run": label}
    result, failure = train_or_reason(module, opts, log)
    if failure:
        return row | failure, None
    cfg, res = result.config, result.config["results"]
    return row | {
        "status": "ok", "reason": "", "weights": cfg["weights_kind"], **_optimizer_and_lrs(cfg),
        "trainable_params": cfg["trainable_params"], "total_params": cfg["total_params"], "device": cfg["device"],
        "feature_cache": cfg.get("feature_cache", "off"),
        **{k: res[k] for k in ("headline", "headline_acc", "test_acc", "baseline_val_acc", "best_val_acc",
                               "best_epoch", "final_val_acc", "final_val_loss", "train_seconds",
                               "train_images_per_s")},
    }, result


def keep_run_files(out: Path, dataset: str, label: str, result) -> None:
    """Copy a finished run's history and headline predictions to out/history/<data>/ and
    out/predictions/<data>/, so every figure can be recomputed from `out` alone. Called only
    once the whole comparison has finished, together with the tables that name these runs."""
    from tl.engine.files import atomic_copy
    from tl.engine.tables import write_table

    for folder in ("history", "predictions"):
        folders.make(out / folder / dataset)
    write_table(out / "history" / dataset / f"{label}.csv", result.history.rows)
    atomic_copy(result.run_dir / "headline_predictions.csv", out / "predictions" / dataset / f"{label}.csv")


def _lrs(lrs: dict) -> str:
    return ", ".join(f"{g} {lr:g}" for g, lr in lrs.items())


def _recipe_lrs(recipe) -> str:
    """The recipe's rates; a staged recipe's head-first stage, then the rest."""
    if recipe.first_lrs:
        return f"first {recipe.first_epochs}: {_lrs(recipe.first_lrs)}; then {_lrs(recipe.lrs)}"
    return _lrs(recipe.lrs)


def _optimizer_and_lrs(cfg: dict) -> dict:
    """The optimizer and rates a run used, stage by stage where it had several (config["stages"]);
    a schedule is named after its stage's rates (the rates are its peaks)."""
    def groups(gs):
        return ", ".join(f"{g['name']} {g['lr']:g}" for g in gs)

    stages = cfg.get("stages", [])
    if len(stages) <= 1:
        schedule = f" ({stages[0]['schedule']})" if stages and stages[0]["schedule"] != "constant" else ""
        return {"optimizer": cfg["optimizer"], "learning_rates": groups(cfg["param_groups"]) + schedule}
    return {"optimizer": " then ".join(dict.fromkeys(s["optimizer"] for s in stages)),
            "learning_rates": "; then ".join(f"{s['name']}: {groups(s['param_groups'])} ({s['schedule']})"
                                             for s in stages)}


def summarize(runs):
    """One row per data set x recipe x backbone: mean ± std over the seeds that ran (pandas groupby).

    std is the sample standard deviation (ddof=1), empty for a single seed."""
    import pandas as pd

    rows = []
    for (dataset, experiment, backbone), g in runs.groupby(KEY, sort=False):
        ok = g[g.status == "ok"]
        first = (ok if len(ok) else g).iloc[0]
        row = {"dataset": dataset, "experiment": experiment, "backbone": backbone,
               **{c: first.get(c) for c in CONSTANT}}
        for c in MEAN_STD:
            row[f"{c}_mean"] = ok[c].mean() if len(ok) else None
            row[f"{c}_std"] = ok[c].std() if len(ok) > 1 else None
        for c in MEAN_ONLY:
            row[f"{c}_mean"] = ok[c].mean() if len(ok) else None
        row["seeds"] = len(ok)
        row["date"] = first["date"]
        row["status"] = "ok" if len(ok) == len(g) else ("not run" if (g.status == "not run").all()
                                                        else "partly failed" if len(ok) else "failed")
        row["reason"] = "" if row["status"] == "ok" else next(r for r in g.reason if isinstance(r, str) and r)
        rows.append(row)
    return pd.DataFrame(rows)


def merge_runs(old, new):
    """The rows of `new`, plus the rows of `old` whose key (data set, recipe, backbone) `new`
    did not run. A key that ran again is replaced with all its seeds, never mixed with old
    ones; rows of a data set from a run of the other kind (--quick or not) are dropped, so
    smoke figures never stand next to real ones. Sorted by data set, recipe order, backbone, seed."""
    import pandas as pd

    if old is not None and len(old):
        ran = set(map(tuple, new[KEY].values))
        kinds = new.groupby("dataset").quick.first()
        keep = old[[tuple(k) not in ran and kinds.get(k[0], bool(q)) == bool(q)
                    for k, q in zip(old[KEY].values, old.quick)]]
        new = pd.concat([keep, new], ignore_index=True) if len(keep) else new
    new = new.assign(_order=new.experiment.map(_order))
    return new.sort_values(["dataset", "_order", "backbone", "seed"], kind="stable").drop(columns="_order")


def read_runs(out: Path):
    """out/runs.csv as written by this version, or None (absent, or from before the headline
    columns existed: those rows cannot be compared honestly and are left out)."""
    from tl.engine.tables import read_table

    path = out / "runs.csv"
    if not path.is_file():
        return None
    old = read_table(path)
    missing = {"dataset", "headline_acc", "quick"} - set(old.columns)
    if missing:
        print(f"note: {path} has no {', '.join(sorted(missing))} column (written before headline numbers); "
              f"its rows are replaced, not merged", flush=True)
        return None
    return old


def update_meta(old: dict, entries: dict[str, dict], machine: str) -> dict:
    """Per data set, the commands its rows come from: a full comparison starts the list
    afresh, a partial one (a subset of recipes, or --quick) is appended to it."""
    datasets = dict(old.get("datasets", {}))
    for dataset, entry in entries.items():
        before = [] if entry["full"] else datasets.get(dataset, {}).get("commands", [])
        if any(c.get("quick") != entry["quick"] for c in before):
            before = []  # rows of the other kind were dropped by merge_runs
        datasets[dataset] = {"data": entry["data"], "commands": before + [entry]}
    note = {"note": old["note"]} if old.get("note") else {}  # a caveat added by hand stays until removed by hand
    return {"machine": machine, "datasets": datasets, **note}


def missing_run_files(out: Path, planned) -> list[Path]:
    """The history/ and predictions/ files that the ok rows of out/runs.csv this comparison
    keeps (`planned` holds the keys it will run) need, and that are not there: deleted by
    hand, or by two comparisons that wrote at once before they took turns (`results_lock`)."""
    old = read_runs(out)
    if old is None:
        return []
    kept = merge_runs(old, planned)
    ok = kept[kept.status == "ok"].reindex(columns=RUN_COLUMNS)
    need = [out / folder / d / f"{r}.csv" for d, r in zip(ok.dataset, ok.run) for folder in ("history", "predictions")]
    return [p for p in need if not p.is_file()]


def remove_stale(out: Path, runs, written: set[Path]) -> list[Path]:
    """Delete outputs that belong to no row any more: history/ and predictions/ files of runs
    that are gone or no longer ok, and plots not drawn this time. Only these generated
    kinds of file are touched (results/ also holds benchmark files)."""
    ok = runs[runs.status == "ok"]
    keep = {out / folder / d / f"{r}.csv" for d, r in zip(ok.dataset, ok.run) for folder in ("history", "predictions")}
    candidates = [p for folder in ("history", "predictions") for p in (out / folder).rglob("*.csv")]
    candidates += [p for pattern in ("curves*.png", "comparison*.png") for p in out.glob(pattern)]
    from tl.engine.files import remove

    removed = [p for p in candidates if p not in keep and p not in written]
    for p in removed:
        remove(p)  # and its data set's folder, once that holds no file
    return removed


def write_outputs(out: Path, runs, meta: dict):
    """Every table and plot, redrawn from all rows of `runs`; then stale files removed.
    Returns the summary and the files removed."""

    from experiments.report import draw_comparison, write_report
    from tl.engine.files import atomic_write_text
    from tl.engine.tables import write_table

    summary = summarize(runs)
    folders.make(out)
    write_table(out / "runs.csv", runs, RUN_COLUMNS)
    write_table(out / "summary.csv", summary)
    written = draw_comparison(out, runs, summary)
    removed = remove_stale(out, runs, written)
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    write_report(out)
    return summary, removed


def results_lock(out: Path, command: str, log=print):
    """Hold `out`'s lock while the block writes there (tl/engine/folder_lock.py): out/.results.lock
    names its holder (process id, command, machine, time). A second comparison waits here until
    the first has finished writing, after saying for whom it waits. The lock goes with the
    process, so a killed holder never leaves it stuck. (Windows has no fcntl: there the folder
    is not locked.) Its files change all together or, on a failure, not at all (files.updating)."""
    from tl.engine.files import updating

    return updating(out, command, note=" (its rows are kept)", log=log)  # and all or none


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tl import Interrupted, TLError
    from tl.engine.command import message
    from tl.engine.files import writable_folder
    from tl.engine.folder_lock import LockLost
    from tl.engine.images import check_layout
    from tl.engine.prepare import resolve_data_dir

    try:
        data_dirs = [resolve_data_dir(d) for d in (args.data or [None])]
        for d in data_dirs:
            if not Path(d).is_dir():
                raise TLError(f"data folder not found: {d}")
            check_layout(d)  # train/ and val/ of classes: else every row would be "not run" and the table replaced
    except TLError as exc:
        say_error(str(exc))
        return 2
    names = [dataset_name(d) for d in data_dirs]
    if len(set(names)) != len(names):
        say_error(f"two data folders with the same name ({', '.join(names)}): tables key data sets "
              f"by folder name")
        return 2

    import pandas as pd

    out: Path = args.out or (Path("runs/quick-results") if args.quick else Path("results"))
    writable_folder(out)  # a folder that cannot be written stops the comparison now, not after hours of training
    if args.runs_dir and args.runs_dir.is_dir() and any(args.runs_dir.iterdir()):
        say_error(f"--runs-dir {args.runs_dir} already holds runs; choose a new folder (each comparison trains "
              f"its own runs)")
        return 2
    from tl.engine.run_folder import make_run_dir

    try:
        plan = plan_of(data_dirs, args)
        planned = pd.DataFrame([{"dataset": dataset_name(d), "experiment": e, "seed": s, "quick": args.quick,
                                 "backbone": row_backbone(e, d, b),
                                 "status": "planned"} for d, e, b, s in plan])
    except TLError as exc:  # tuned_<recipe> asked for a data set it has no numbers for
        say_error(str(exc))
        return 2
    if missing := missing_run_files(out, planned):  # found now, not after hours of training
        say_error(f"{out}/runs.csv names runs whose files are gone: {', '.join(map(str, missing[:3]))}"
              f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''}; run those recipes again into "
              f"{out} (--experiments, --backbone), or delete their rows from runs.csv")
        return 2

    # a folder of its own, even for two comparisons started in the same second (-2, -3, ...)
    runs_dir = args.runs_dir or make_run_dir(Path("runs"), f"compare-{time.strftime('%Y%m%d-%H%M%S')}", False)
    commit = git_commit()  # read now: the code that runs is the code loaded at the start
    command = "python -m experiments.compare_all " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    started = time.time()
    rows, finished, minutes = [], [], dict.fromkeys(names, 0.0)
    for i, (data_dir, name, backbone, seed) in enumerate(plan, 1):
        t0 = time.time()
        print(f"[{i}/{len(plan)}] {dataset_name(data_dir)}: {name} on {backbone}, seed {seed}  "
              f"({(t0 - started) / 60:.1f} min so far)", flush=True)
        try:
            row, result = run_one(name, backbone, seed, data_dir, args, runs_dir, log=lambda s: print(s, flush=True))
        except (Interrupted, KeyboardInterrupt):  # command() says it, with 130 for Ctrl-C and 143 for SIGTERM
            raise Interrupted(f"interrupted: {unchanged(out, runs_dir)}") from None
        except (OSError, LockLost) as exc:  # the machine's problem, not the recipe's (common.train_or_reason)
            say_error(f"{message(exc)}; {unchanged(out, runs_dir)}")
            return 2
        if result is not None:
            finished.append((row["dataset"], row["run"], result))
        minutes[row["dataset"]] += (time.time() - t0) / 60
        tail = (f"headline acc {row['headline_acc']:.4f} ({row['headline']})" if row["status"] == "ok"
                else row["reason"])
        print(f"[{i}/{len(plan)}] {row['status']}: {tail}", flush=True)
        rows.append(row)
    total = round((time.time() - started) / 60, 1)
    full = set(NAMES) <= set(args.experiments) and not args.quick
    entries = {dataset_name(d): {
        "data": str(d), "command": command, "experiments": experiments_for(d, args), "backbones": args.backbone,
        "rows": sorted({(r["experiment"], r["backbone"]) for r in rows if r["dataset"] == dataset_name(d)}),
        "seeds": args.seeds, "epochs": args.epochs, "quick": args.quick, "full": full, "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M"), "minutes": round(minutes[dataset_name(d)], 1),
        "command_minutes": total} for d in data_dirs}
    try:
        # one writer at a time; its files all change or, on a failure (a full disk), none does
        with results_lock(out, command, log=lambda s: print(s, flush=True)):
            for dataset, label, result in finished:
                keep_run_files(out, dataset, label, result)
            runs = merge_runs(read_runs(out), pd.DataFrame(rows).reindex(columns=RUN_COLUMNS))
            old_meta = json.loads((out / "meta.json").read_text()) if (out / "meta.json").is_file() else {}
            summary, removed = write_outputs(out, runs, update_meta(old_meta, entries, machine_description()))
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted while waiting for or writing {out}; the runs are in {runs_dir}") from None
    for path in removed:  # said once the block has succeeded: a failed one puts them back
        print(f"removed stale {path}")
    print(summary[KEY + ["status", "headline_acc_mean", "headline_acc_std", "best_val_acc_mean",
                         "train_seconds_mean"]].to_string(index=False))
    print(f"wrote {out}/summary.csv, runs.csv, plots and README.md ({total} min)")
    return 0


if __name__ == "__main__":
    from tl.engine.command import command  # the one error: line and exit 2 every command shares

    sys.exit(command(main))
