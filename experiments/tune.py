"""Tuning without peeking: choose a recipe's numbers on images carved from train, never on val or test.

    python -m experiments.tune --recipe modern_finetune --data ../shared/data/hymenoptera_data \\
        --backbone efficientnet_lite0 --trials 30
    python main.py -e tuned_modern_finetune --data ../shared/data/hymenoptera_data

Why an inner split. A search tries many settings and keeps the best-scoring one. Were it
scored on val (or test), the winner's number would be the largest of many noisy
measurements on those very images: it flatters the winner, and val and test would no longer
measure anything honestly (the "winner's curse"; Cawley & Talbot, JMLR 2010, call it
overfitting in model selection). So every trial trains on an *inner train* and is scored
on an *inner val*, both carved from train/ by `tl.engine.selection.select_images` (seeded,
the same share of each class); val/ and test/ are not even listed during the search. The
chosen recipe, `tuned_<recipe>`, is then trained on all of train and scored like any other
(`compare_all`), so its headline is as honest as theirs.

`--inner-val 0.2` (the default) holds out a fifth of each class: one training run per
trial, but hymenoptera's 244 training images leave 49 to score on, where one image is 2
points of accuracy, so settings closer than that are told apart by noise. `--folds K`
scores every training image once: K runs per trial, each holding out one fold and training
on the rest, and the trial's score is their mean (one image: 0.4 points). It costs K times
the CPU time per trial, so within the same time a search tries K times fewer settings.

What is searched (the table SPACE in tl/engine/tuning.py; one row per number, a new Recipe
field is one more row): every learning rate times `lr_scale` (log-uniform 0.1-10), the
body/neck rates relative to the head (`body_factor`), weight decay where the recipe's
optimizer reads one, the training epochs (up to the recipe's own, or `--max-epochs`),
label smoothing, the augmentation (tutorial / standard / strong), and the BatchNorm policy
(train / frozen layers in eval / all in eval: experiments/bn_policy.py).

How. Optuna's TPE sampler (Bergstra et al., NeurIPS 2011) first draws at random, then
splits the trials so far into the better ones and the rest, models where each lies in the
search space, and proposes numbers that are likely under the first and unlikely under the
second. The median pruner stops a trial after an epoch when its best inner val accuracy so
far is below the median of the completed trials at the same epoch (from the 6th trial and
the 2nd epoch on, and where at least 3 completed trials reached that epoch; with --folds,
each trial's fold 0 against the others' fold 0): bad settings cost a few epochs, not a
whole run. It compares equal epoch numbers, so a short schedule (its cosine already low)
is compared with the early epochs of a long one: pruning favours fast starters. A trial
whose loss diverges counts as pruned.

The study lives in a SQLite file (`--storage`, default $TL_CACHE_DIR/tuning/<recipe>-<data
set>.db), or in a database several machines reach (`--storage postgresql://...`): run the
same command again and an interrupted search goes on with the trials still missing (Ctrl-C
exits with 130, SIGTERM with 143, and every finished trial is kept), and run it in several terminals or on
several machines and they share the search (`tune --help` says how). Each trial draws its
numbers from a random stream of its own, seeded by `--seed` and the trial's number: one
uninterrupted search from an empty study is repeatable, while workers, and a search run
again after a kill, never draw the same numbers. A trial whose process was killed is failed
when the search is run again and its numbers are tried once more, labelled as a retry
(tl/engine/trials.py); the pages and the tuned file name both. The study records the
recipe, the data set (its name and the fingerprint of train/), the backbone and the inner
split; it refuses a search that asks another question. Trial runs are ordinary runs of the one loop
(tl.engine.run.run) under `--runs-dir`; their weights are deleted after scoring.

Written at the end:

    experiments/tuned/<recipe>-<data set>-<backbone>.json   the chosen numbers (--tuned-dir): tuned_<recipe>
    <out>/<recipe>-<data set>-<backbone>/trials.md, .csv    one row per trial: state, numbers, inner score, time
    <out>/<recipe>-<data set>-<backbone>/history.png        inner score per trial, and the best so far
    <out>/<recipe>-<data set>-<backbone>/importance.png     which numbers mattered (PED-ANOVA, Optuna's default)

`--quick` is a smoke search (8 images per class, 64-pixel crops, at most 2 epochs) that
writes to runs/quick-tuning/ and leaves experiments/tuned/ alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import shutil
import sys
import time
import warnings
from pathlib import Path

from experiments import NAMES, get_experiment, tuned_dir, tuned_file
from tl.engine import folders
from tl.engine.command import say_error
from tl.engine.tables import page_code, page_text

FINISHED = ("COMPLETE", "PRUNED")  # the trials a budget of --trials counts


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.tune", description=__doc__.split("\n\n")[0],
                                epilog=SHARED, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True, choices=NAMES, metavar="NAME", help="the recipe whose numbers to tune")
    p.add_argument("--data", metavar="DIR", help="data folder with train/ (default: $TL_DATA_DIR or "
                   "data/hymenoptera_data); val/ and test/ are not read")
    p.add_argument("--trials", type=int, required=True, help="finished trials (complete or pruned) to reach")
    p.add_argument("--backbone", help="the backbone to tune on (default: the recipe's)")
    p.add_argument("--weights", help="imagenet | PATH to a state_dict (default: the recipe's)")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--inner-val", type=float, default=None, metavar="FRACTION",
                       help="score each trial on this fraction of each class of train/ (default 0.2)")
    split.add_argument("--folds", type=int, help="score each trial by K-fold cross-validation over train/ instead")
    p.add_argument("--seed", type=int, default=0, help="seed of the inner split, the trial runs and, with each "
                   "trial's number, of the trial's random stream (below)")
    p.add_argument("--max-epochs", type=int, help="most training epochs a trial may draw (default: the recipe's)")
    p.add_argument("--storage", type=_storage, metavar="FILE|URL", help="the study: a SQLite file (default "
                   "$TL_CACHE_DIR/tuning/<recipe>-<data set>-<backbone>.db), or a database URL that several "
                   "machines share (postgresql://user:password@host:5432/database)")
    p.add_argument("--study-name", help="default <recipe>-<data set>-<backbone>")
    p.add_argument("--out", type=Path, help="pages folder (default results/tuning; --quick: runs/quick-tuning)")
    p.add_argument("--tuned-dir", type=Path, help="where the chosen numbers go (default experiments/tuned, or "
                   "$TL_TUNED_DIR; --quick: <out>/tuned)")
    p.add_argument("--runs-dir", type=Path, help="the trials' run folders (default runs/tune/<study name>)")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes of each trial run")
    p.add_argument("--quick", action="store_true", help="smoke search: 8 images per class, 64 pixels, 2 epochs")
    return p.parse_args(argv)


SHARED = """\
A shared search: run the same command in several terminals (the processes of one machine share
the SQLite file), or on several machines with --storage postgresql://user@host:5432/db (one
database they all reach; pip install psycopg2-binary; the password from PGPASSWORD or ~/.pgpass
keeps it off the command line, which the machine's users can see). Each search process runs
trials until the study holds --trials finished ones, so the budget is exceeded by at most
(processes - 1) trials: each finishes the trial it started. A process that ends while others
still run a trial says so, and the last one writes the tuned file and the pages.

--seed and the random numbers: each trial draws from a random stream of its own, seeded by --seed
and the trial's number (the study numbers the trials of all processes). One uninterrupted search
from an empty study is repeatable; two processes, or a search run again after a kill, never draw
the same numbers. A trial whose process was killed is failed when the search is run again (at
once on the same machine; after 3 minutes without a heartbeat from another one), and its numbers
are tried once more, as a trial labelled retry_of."""


def _storage(value: str):
    from tl.engine.tuning import storage_arg

    return storage_arg(value)


def check_args(args: argparse.Namespace) -> None:
    """The numbers argparse cannot check alone, each refused in one line (main: exit 2)."""
    from tl import TLError

    if args.trials < 1:
        raise TLError(f"--trials must be at least 1, got {args.trials}")
    if args.inner_val is not None and not 0 < args.inner_val < 1:
        raise TLError(f"--inner-val must be between 0 and 1 (a fraction such as 0.2), got {args.inner_val}")
    if args.folds is not None and args.folds < 2:
        raise TLError(f"--folds must be at least 2, got {args.folds}")
    if args.max_epochs is not None and args.max_epochs < 1:
        raise TLError(f"--max-epochs must be at least 1, got {args.max_epochs}")
    if args.quick and args.max_epochs is not None:
        raise TLError("--quick draws at most 2 epochs per trial: leave out --max-epochs, or --quick")
    if args.inner_val is None and args.folds is None:
        args.inner_val = 0.2


@dataclasses.dataclass
class Search:
    """What every trial of one search shares."""

    args: argparse.Namespace
    recipe: object  # the base Recipe, on the search's backbone and weights
    build: object
    data: Path
    runs_dir: Path
    max_epochs: int


def trial_options(s: Search, run_name: str, fold: int):
    """A trial run's options: the inner split, a scratch folder, no pictures or bars."""
    from tl.engine.options import RunOptions

    a = s.args
    opts = RunOptions(data=s.data, seed=a.seed, split_seed=a.seed, workers=a.workers, device=a.device,
                      out=s.runs_dir, run_name=run_name, plots=False, progress=False,
                      inner_val=None if a.folds else a.inner_val, folds=a.folds, inner_fold=fold)
    if a.quick:
        opts.make_quick()
        opts.epochs = None  # the trial's drawn epochs are in its recipe
    return opts


def pruning_reporter(trial, fold: int, log):
    """The loop's end-of-epoch hook for one trial run: report the epoch's inner val accuracy
    to Optuna and stop the run (optuna.TrialPruned) when the pruner says so. With folds, the
    first fold's curve is the one reported and pruned on."""
    import optuna

    def on_epoch(epoch: int, history) -> None:
        acc = history.val()[-1]["acc"]
        log(f"  trial {trial.number}{f' fold {fold}' if fold is not None else ''} epoch {epoch}: "
            f"inner val acc {acc:.4f}")
        if fold in (None, 0):
            trial.report(acc, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"inner val acc {acc:.4f} after epoch {epoch} is below the median")
    return on_epoch


def score_trial(trial, s: Search, log=print) -> float:
    """One trial: the recipe with its drawn numbers, trained on inner train through the one loop
    and scored on inner val by the run's headline (with no test split, the final epoch's inner
    val accuracy: nothing is selected on these images either, and a recipe's test-time
    averaging counts); with --folds, the mean over the folds."""
    import optuna

    from tl.engine.run import run
    from tl.engine.tuning import suggest
    from tl.loop import NonFiniteLoss

    recipe = dataclasses.replace(s.recipe, **suggest(trial, s.recipe, s.max_epochs))
    log(f"trial {trial.number}: " + ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items()))
    cpu, scores = cpu_seconds(), []
    try:
        for fold in range(s.args.folds or 1):
            name = f"trial{trial.number:04d}" + (f"-fold{fold}" if s.args.folds else "")
            shutil.rmtree(s.runs_dir / name, ignore_errors=True)  # left by a killed process of a deleted study
            try:
                result = run(recipe, s.build, trial_options(s, name, fold), log=lambda line: None,
                             on_epoch=pruning_reporter(trial, fold if s.args.folds else None, log))
            except (optuna.TrialPruned, NonFiniteLoss) as exc:
                shutil.rmtree(s.runs_dir / name, ignore_errors=True)  # a pruned trial leaves nothing behind
                trial.set_user_attr("pruned_because", str(exc).splitlines()[0])
                raise optuna.TrialPruned(str(exc)) from None
            scores.append(result.config["results"]["headline_acc"])  # no test split: the final epoch's inner val
            for f in [*result.run_dir.glob("*.pth"), *result.run_dir.glob("*.ckpt")]:
                f.unlink()  # the numbers are what a trial leaves; its config.json and history.csv stay
    finally:
        trial.set_user_attr("cpu_seconds", cpu_seconds() - cpu)
    log(f"trial {trial.number}: inner score {sum(scores) / len(scores):.4f}")
    return sum(scores) / len(scores)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the DataLoader workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _short(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def prepare(args: argparse.Namespace, data: Path):
    """The base recipe on the search's backbone, the setup a study file must match, and the
    checks that must stop a search before its first trial (the inner split is drawn once)."""
    from tl.data import build_transforms
    from tl.engine.backbones import backbone_spec
    from tl.engine.run_folder import data_fingerprint
    from tl.engine.selection import ImageChoice, select_images
    from tl.engine.weights import require_imagenet

    module = get_experiment(args.recipe)
    recipe = dataclasses.replace(module.RECIPE, **{k: v for k, v in (("backbone", args.backbone),
                                                                     ("weights", args.weights)) if v})
    spec = backbone_spec(recipe.backbone)
    if recipe.weights == "imagenet":
        require_imagenet(spec)  # offline and not cached: said now, not in the first trial
    transforms = build_transforms(spec.mean, spec.std, size=64 if args.quick else spec.image_size, augment=False)
    choice = ImageChoice(data, max_per_class=8 if args.quick else None, split_seed=args.seed)
    train = select_images(choice, transforms, phases=("train",), log=print)
    inner = dataclasses.replace(choice, inner_val=None if args.folds else args.inner_val, folds=args.folds)
    select_images(inner, transforms, log=lambda line: None)  # a class too small to split stops here
    max_epochs = 2 if args.quick else (args.max_epochs or recipe.train_epochs)
    setup = {"recipe": args.recipe, "dataset": data.resolve().name, "data_fingerprint": data_fingerprint(train),
             "backbone": recipe.backbone, "weights": recipe.weights, "inner_val": inner.inner_val,
             "folds": args.folds, "seed": args.seed, "max_epochs": max_epochs, "quick": args.quick}
    return Search(args, recipe, module.build, data, Path(), max_epochs), setup


def finished(study) -> list:
    return [t for t in study.trials if t.state.name in FINISHED]


def chosen(study):
    """The complete trial whose numbers the tuned file keeps, and the other complete trials that tie
    with its score. Scores are counts of inner images, so ties are common; Optuna's `best_trial`
    leaves a tie to the database's row order, so the lowest trial number is taken here, the same on
    SQLite and PostgreSQL. A k-fold score is a mean of fractions, whose last bit depends on the
    order of the sum: (1 + 1 + 0.985) / 3 and (1 + 0.995 + 0.99) / 3, 597 of 600 on three folds of
    200 each, differ by 1e-16, so scores within 1e-9 tie."""
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    top = max(t.value for t in complete)
    best, *tied = sorted((t for t in complete if math.isclose(t.value, top, rel_tol=1e-9)), key=lambda t: t.number)
    return best, [t.number for t in tied]


def write_tuned(study, s: Search, setup: dict, path: Path, command: str) -> Path:
    """The chosen numbers, and how they were chosen: the file tuned_<recipe> reads."""
    import optuna

    from tl.engine.feature_store import cache_dir
    from tl.engine.trials import failures, retries
    from tl.engine.tuning import shown_storage, suggest

    best, tied = chosen(study)
    fields = suggest(optuna.trial.FixedTrial(best.params), s.recipe, s.max_epochs)
    fields["backbone"], fields["weights"] = s.recipe.backbone, s.recipe.weights  # the network the numbers fit
    states = [t.state.name for t in study.trials]
    tuned = {"recipe": setup["recipe"], "dataset": setup["dataset"], "backbone": s.recipe.backbone,
             "data_fingerprint": setup["data_fingerprint"],
             "inner_split": {"inner_val": setup["inner_val"], "folds": setup["folds"], "seed": setup["seed"]},
             "trials": {"budget": s.args.trials, **{k.lower(): states.count(k) for k in (*FINISHED, "FAIL")}},
             "best_trial": best.number, "best_inner_score": best.value, "tied_with_best": tied, "params": best.params,
             "over_budget": over_budget(study, s.args.trials),
             "failed_trials": {str(n): why for n, why in failures(study).items()},
             "retries": {str(n): of for n, of in retries(study).items()},
             "recipe_fields": fields, "cpu_seconds": round(total_cpu(study), 1), "command": command,
             "study": {"storage": shown_storage(s.args.storage, cache_dir()), "name": study.study_name},
             "quick": s.args.quick,
             "date": time.strftime("%Y-%m-%d %H:%M")}
    from tl.engine.files import atomic_write_text

    return atomic_write_text(path, json.dumps(tuned, indent=2) + "\n")


def over_budget(study, budget: int) -> int:
    """Finished trials beyond the budget: search processes that run at once each finish the trial they
    started when the budget is reached, so at most (processes - 1)."""
    return max(0, len(finished(study)) - budget)


def total_cpu(study) -> float:
    return sum(t.user_attrs.get("cpu_seconds", 0.0) for t in study.trials)


def trial_rows(study) -> list[dict]:
    from tl.engine.trials import failure

    rows, attrs = [], study.user_attrs
    for t in study.trials:
        steps = sorted(t.intermediate_values)
        rows.append({"number": t.number, "state": t.state.name, "inner_score": t.value,
                     "last_epoch": steps[-1] if steps else None,
                     "duration_s": round(t.duration.total_seconds(), 1) if t.duration else None,
                     "cpu_s": round(t.user_attrs.get("cpu_seconds", math.nan), 1),
                     **{f"param {k}": v for k, v in t.params.items()},
                     "retry_of": t.user_attrs.get("retry_of"), "failed_because": failure(attrs, t)})
    return rows


def write_pages(study, s: Search, setup: dict, folder: Path, command: str) -> list[Path]:
    """trials.csv and trials.md (one row per trial, the budget, the CPU time), history.png, importance.png."""
    import pandas as pd

    from tl.engine.files import atomic_write_text
    from tl.engine.tables import write_table

    folders.make(folder)
    df = pd.DataFrame(trial_rows(study))
    write_table(folder / "trials.csv", df)
    importances = draw_importance(study, folder / "importance.png")
    draw_history(study, folder / "history.png")
    done = finished(study)
    complete = [t for t in done if t.state.name == "COMPLETE"]
    split = (f"{setup['folds']}-fold cross-validation over train/" if setup["folds"]
             else f"inner val = {setup['inner_val']} of each class of train/")
    lines = [f"# Tuning {setup['recipe']} on {page_text(setup['dataset'])} ({setup['backbone']})", "",
             f"{page_code(command)}", "",
             f"Scored on an inner split carved from train (seed {setup['seed']}): {split}. val/ and test/ were not "
             f"read. Budget: {s.args.trials} finished trials; {len(done)} finished "
             f"({over_budget(study, s.args.trials)} over the budget: search processes running at once each finish "
             f"the trial they started): {len(complete)} complete, {len(done) - len(complete)} pruned; "
             f"{len(study.trials) - len(done)} failed, running or waiting. CPU time of the trials: "
             f"{total_cpu(study):.0f} s = {total_cpu(study) / 3600:.2f} h (user + system, the trials' processes and "
             f"their DataLoader workers).", ""]
    lines += lost_lines(study)
    if complete:
        best, tied = chosen(study)
        lines += [f"Best: trial {best.number}, inner score {best.value:.4f} (a maximum over trials: it flatters; "
                  f"train tuned_{setup['recipe']} and read its headline instead).{tie_text(tied)}", ""]
    lines += [markdown_table(df) if len(df) else "(no trials)", "",
              "Parameter importance (PED-ANOVA): " + (", ".join(f"{k} {v:.2f}" for k, v in importances.items())
                                                      or "needs at least 2 complete trials"), "",
              "![history](history.png) ![importance](importance.png)", ""]
    atomic_write_text(folder / "trials.md", "\n".join(lines))
    return [folder / n for n in ("trials.md", "trials.csv", "history.png", "importance.png")]


def tie_text(tied: list[int]) -> str:
    if not tied:
        return ""
    who = f"Trials {', '.join(map(str, tied))} tie" if len(tied) > 1 else f"Trial {tied[0]} ties"
    return f" {who} with it: the inner split cannot tell them apart, and the lowest trial number is kept."


def lost_lines(study) -> list[str]:
    """The page's words on the failed trials and the retries (tl/engine/trials.py)."""
    from tl.engine.trials import failures, retries

    lines = [f"- trial {n} failed: {why}" for n, why in failures(study).items()]
    lines += [f"- trial {n} tries again the numbers of trial {of}, whose process was lost (once at most)"
              for n, of in retries(study).items()]
    return [*lines, ""] if lines else []


def markdown_table(df) -> str:
    cells = [[_short(v) if v == v and v is not None else "" for v in row] for row in df.itertuples(index=False)]
    return "\n".join(["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns),
                      *("| " + " | ".join(row) + " |" for row in cells)])


def draw_history(study, path: Path) -> Path:
    """Inner score of each trial (pruned ones at their last reported epoch) and the best so far."""
    from tl.engine.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    pruned = [t for t in study.trials if t.state.name == "PRUNED" and t.intermediate_values]
    ax.plot([t.number for t in done], [t.value for t in done], "o", label="complete: inner score")
    ax.plot([t.number for t in pruned], [t.intermediate_values[max(t.intermediate_values)] for t in pruned], "x",
            color="grey", label="pruned: inner val acc when stopped")
    best, line = -math.inf, []
    for t in done:
        best = max(best, t.value)
        line.append((t.number, best))
    if line:
        ax.step(*zip(*line), where="post", color="tab:red", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("inner val accuracy")
    ax.xaxis.get_major_locator().set_params(integer=True)  # trials are whole numbers
    fig.legend(loc="outside lower center", ncols=3, fontsize="small")  # below the axes: it hides no point
    return save_figure(fig, path)


def draw_importance(study, path: Path) -> dict:
    """Optuna's PED-ANOVA importances (pure numpy/scipy; fANOVA would need scikit-learn), as bars."""
    import optuna

    from tl.engine.plots import plt, save_figure

    try:
        with warnings.catch_warnings():  # "quantiles select the same set of trials" with few trials: all equal
            warnings.simplefilter("ignore", UserWarning)
            importances = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
    except Exception:  # noqa: BLE001 - too few trials, or all alike: the picture says so, the search is kept
        importances = {}
    fig, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
    if importances:
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names])
        ax.set_xlabel("importance (PED-ANOVA, sums to 1)")
    else:
        ax.text(0.5, 0.5, "not enough complete trials to say", ha="center", va="center")
        ax.set_axis_off()
    save_figure(fig, path)
    return importances


PATH_OPTIONS = ("--data", "--weights", "--storage", "--out", "--tuned-dir", "--runs-dir")


def shown_argv(args: argparse.Namespace, argv: list[str]) -> list[str]:
    """The arguments as the tuned file, the pages and the lock's line record them (tuned files and
    pages are committed: they name no machine's folders). Every path is shown as
    tl.engine.tuning.recorded_path shows the study file: relative to the working folder, or
    under $TL_CACHE_DIR, else ".../<its name>" (elided: a folder of this machine); a --storage
    URL without its password and without its options (?host= may name a socket's folder)."""
    from tl.engine.feature_store import cache_dir
    from tl.engine.tuning import recorded_path, shown_storage

    def shown(option: str, value: str) -> str:
        if option == "--storage" and isinstance(args.storage, str):
            return shown_storage(args.storage, cache_dir())
        if option == "--weights" and value in ("imagenet", "none"):
            return value
        path = (args.storage if option == "--storage" else Path(value)).resolve()
        inside = any(path.is_relative_to(root.resolve()) for root in (cache_dir(), Path.cwd()))
        return recorded_path(path, cache_dir()) if inside else f".../{path.name}"

    out, argv = [], list(argv)
    for i, a in enumerate(argv):
        option, eq, value = a.partition("=")
        if option in PATH_OPTIONS and eq:
            out.append(f"{option}={shown(option, value)}")
        elif i and argv[i - 1] in PATH_OPTIONS:
            out.append(shown(argv[i - 1], a))
        else:
            out.append(a)
    return out


def main(argv=None) -> int:
    from tl import Interrupted, TLError

    args = parse_args(argv)
    command = "python -m experiments.tune " + " ".join(shlex.quote(a) for a in shown_argv(args, argv or sys.argv[1:]))
    try:
        return search(args, command)
    except (KeyboardInterrupt, Interrupted):  # Ctrl-C or SIGTERM: tl.engine.command says it, with its exit status
        from tl.engine.tuning import shown_storage

        raise Interrupted(f"interrupted: the study in {shown_storage(args.storage)} keeps its finished trials; run "
                          f"the same command again to go on") from None
    except TLError as exc:
        say_error(str(exc))
        return 2


def search(args: argparse.Namespace, command: str) -> int:
    import optuna

    from tl.engine.command import interrupts_noted, stop_if_interrupted
    from tl.engine.feature_store import cache_dir
    from tl.engine.files import writable_folder
    from tl.engine.prepare import resolve_data_dir
    from tl.engine.trials import run_trial
    from tl.engine.tuning import open_study, shown_storage, storage_errors

    check_args(args)
    data = resolve_data_dir(args.data)
    s, setup = prepare(args, data)
    key = tuned_file(args.recipe, setup["dataset"], s.recipe.backbone).stem  # <recipe>-<data set>-<backbone>
    name = args.study_name or key
    args.storage = args.storage or cache_dir() / "tuning" / f"{key}{'-quick' if args.quick else ''}.db"
    out = args.out or Path("runs/quick-tuning" if args.quick else "results/tuning")
    tuned = args.tuned_dir or (out / "tuned" if args.quick else tuned_dir())
    s.runs_dir = args.runs_dir or Path("runs/tune") / name
    check_tuned_file(tuned / f"{key}.json", name)
    for folder in (out, tuned):  # a folder that cannot be written stops the search before its trials
        writable_folder(folder)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with storage_errors(args.storage), interrupts_noted():  # a failing study database: one error: line; an
        # interrupt whose exception a garbage collector's callback swallowed still stops the search (called
        # as tune.main, not through tl.engine.command.command, which notes them for every command)
        study = open_study(args.storage, name, setup, args.seed)
        remaining = args.trials - len(finished(study))
        print(f"study {name!r} in {shown_storage(args.storage)}: {len(finished(study))} of {args.trials} trials "
              f"finished; running {max(0, remaining)}", flush=True)
        if remaining > 0:  # every worker stops once the study holds the budget's finished trials
            def log(line: str) -> None:
                print(line, flush=True)

            budget = optuna.study.MaxTrialsCallback(args.trials, states=tuple(
                getattr(optuna.trial.TrialState, k) for k in FINISHED))
            study.optimize(lambda trial: run_trial(trial, lambda t: score_trial(t, s, log=log)),
                           n_trials=remaining, gc_after_trial=True, callbacks=[stop_if_interrupted, budget])
        return write_results(study, s, setup, Written(out / key, tuned / f"{key}.json", command))


def check_tuned_file(path: Path, study: str) -> None:
    """Stop before the first trial where `path` holds the numbers of another study (another
    --study-name on the same recipe, data set and backbone): its tuned file, which tuned_<recipe>
    reads, is not replaced by a second study's. The same study's file is written again."""
    from tl import TLError

    try:
        theirs = json.loads(path.read_text())["study"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # none yet, or not a tuned file of a search: tuned_recipe says what is wrong with it
    if theirs != study:
        raise TLError(f"{path} holds the numbers of study {theirs!r}, not of this search's study {study!r}: "
                      f"choose another --tuned-dir (and --out) for it, or remove that file to replace them")


LOCK_NAME = ".tune.lock"  # in the pages' folder (--out): one worker writes the pages and the tuned file


@dataclasses.dataclass
class Written:
    """Where a search's results go: its pages' folder, its tuned file, and the command it records."""

    pages: Path
    tuned: Path
    command: str


def write_results(study, s: Search, setup: dict, to: Written) -> int:
    """The pages and the tuned file, written by one process of a shared search: under the lock
    of --out, the process that finds no trial running (the last to end). Where the study's
    results were written for exactly the trials it holds now (by a process that ended at the
    same moment, or by an earlier run of the command) and the files are there, they are left."""
    from optuna.trial import TrialState

    from tl.engine.files import updating
    from tl.engine.trials import this_process
    from tl.engine.tuning import lost_trials

    # the pages and the tuned file change together, or none does (a process killed midway is undone by the next)
    with updating(to.pages.parent, to.command, lock=LOCK_NAME, note=" (another process of this search)"):
        lost = lost_trials(study)
        lost.sweep(study, when="when a process of the search ended")
        if running := lost.still_running(study):
            print(f"trials {', '.join(map(str, running))} still run in other processes: the last process to end "
                  f"writes the tuned file and the pages")
            return 0
        ended = sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))
        written = study.user_attrs.get("results_written", {})
        if written.get("trials") == ended and (to.pages / "trials.md").is_file() and to.tuned.is_file():
            print(f"the tuned file and the pages of these {ended} trials were written by {written.get('by')}: "
                  f"{to.pages / 'trials.md'}")
            return 0
        complete = any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
        pages = write_pages(study, s, setup, to.pages, to.command)
        path = write_tuned(study, s, setup, to.tuned, to.command) if complete else None
    me = this_process()  # recorded once the files are in place: a process killed before has its pages undone
    study.set_user_attr("results_written", {"trials": ended, "by": f"host {me['host']}, pid {me['pid']}"})
    if path is None:
        print(f"no trial completed (all pruned or failed): no tuned numbers written; pages: {pages[0]}")
        return 0
    best, tied = chosen(study)
    print(f"best: trial {best.number}, inner score {best.value:.4f} -> {path}; pages: {pages[0]}{tie_text(tied)}")
    print(f"train it on all of train and score it on val/test: {train_command(s.args, s.data)}")
    return 0


def train_command(args: argparse.Namespace, data) -> str:
    """The command that trains the tuned recipe, as a user types it: where the tuned file is not in
    the default folder, TL_TUNED_DIR says where; the backbone when one was given; paths quoted."""
    where = f"TL_TUNED_DIR={shlex.quote(str(args.tuned_dir))} " if args.tuned_dir else ""
    backbone = f" -b {shlex.quote(args.backbone)}" if args.backbone else ""
    return f"{where}python main.py -e tuned_{args.recipe}{backbone} --data {shlex.quote(str(data))}"


if __name__ == "__main__":
    from tl.engine.command import command  # the one error: line and exit 2 every command shares

    sys.exit(command(main))
