"""One experiment = a Recipe (the numbers) + a build function (what trains) + `run`.

A recipe file in `experiments/` holds a `RECIPE = Recipe(...)` with the numbers of
its source document and a `build(model, spec, recipe)` that decides which parameters
train and with which optimizer. `run` does everything else the same way for every
recipe: data, model, loop, checkpoints, and the run folder::

    runs/<experiment>-<backbone>-<YYYYmmdd-HHMMSS>/
        config.json    the resolved configuration and, at the end, the results
        history.csv    one row per (epoch, phase)
        best.pth       state_dict of the best validation epoch
        last.ckpt      full training checkpoint after the latest epoch (--resume)
        headline_predictions.csv  per image: path, label, prediction of the headline model
                       (score_headline: test with the epoch chosen on val, else val's final epoch)
        NN.pth         every epoch's state_dict, with --save-every-epoch (document 001)
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tl import TLError, checkpoint, features
from tl.data import (
    build_transforms,
    decoded_images,
    describe_skipped,
    image_datasets,
    keep_train_per_class,
    make_loaders,
    split_datasets,
    val_resize,
)
from tl.loop import History, NonFiniteLoss, make_grad_scaler, predictions, resolve_device, seed_everything, train_model
from tl.models import Backbone, create_model, format_parameter_table, get_backbone, parameter_table


@dataclass(frozen=True)
class Recipe:
    """The numbers of one variant from the source documents. A recipe file overrides only
    the fields that differ from these defaults, and says why. An unknown field is an error
    (the dataclass constructor rejects it)."""

    name: str  # registry key and run-folder prefix, e.g. "vgg_finetune"
    source: str  # document and section it reproduces, e.g. "002 §1.4"
    strategy: str  # one line: what trains
    backbone: str = "resnet18"  # the document's architecture; --backbone swaps it, the strategy stays
    weights: str = "imagenet"  # "imagenet" (pretrained) or "none" (random init)
    lrs: dict[str, float] = field(default_factory=lambda: {"all": 1e-3})  # per group: body/neck/head, or all
    train_epochs: int = 10  # epochs that train; the loop adds the validation-only epoch 0
    batch_size: int = 32
    frozen_bn_eval: bool = False  # keep frozen BatchNorm layers in eval mode while training
    loss: str = "cross_entropy"  # or "bce_logit" for a one-logit head
    stack_head: bool = False  # keep the ImageNet head and stack a new Linear(1000, n) on it (004 §3)

    @property
    def num_epochs(self) -> int:
        """The loop's `num_epochs` in 002's sense: the baseline epoch 0 plus the training epochs."""
        return self.train_epochs + 1


BuildFn = Callable[[nn.Module, Backbone, Recipe], tuple[nn.Module, torch.optim.Optimizer]]


@dataclass
class RunOptions:
    """Everything about a run that is not the recipe's own numbers (the command line's options)."""

    data: Path
    backbone: str | None = None  # None: the recipe's own
    weights: str | None = None  # None: the recipe's own; "imagenet", "none" or a file path
    epochs: int | None = None  # training epochs; None: the recipe's own
    batch_size: int | None = None
    lr_scale: float = 1.0  # multiplies every learning rate of the recipe
    device: str = "auto"
    seed: int = 0
    workers: int = 2
    out: Path = Path("runs")
    run_name: str | None = None  # folder name inside `out`; default <experiment>-<backbone>-<time>
    image_size: int = 224  # crop size; the val resize keeps 002's 256/224 ratio
    max_per_class: int | None = None  # use only the first N images of each class (smoke runs)
    train_per_class: int | None = None  # train on a seeded draw of N images per class (split_seed; val untouched)
    val_split: float | None = None  # split a folder of class folders into train/val (seeded, per class)
    split_seed: int = 0  # seed of that split alone: a training --seed must not change the val images
    verify_images: bool = False  # fully decode every image before training (finds truncated files)
    augment: bool = True
    save_every_epoch: bool = False
    amp: bool = True  # mixed precision, only ever used on CUDA
    channels_last: bool = True  # NHWC memory layout: faster on GPUs, and on this CPU (results/benchmark.md)
    feature_cache: bool = True  # cache what a frozen prefix computes (tl/features.py) when that is exact
    cache_views: int = 0  # with augmentation: K precomputed augmented views per train image (0: train uncached)
    cache_limit_gb: float = 2.0  # refuse a feature or image cache larger than this
    image_cache: bool = False  # decode and resize every image once, keep uint8 tensors in memory
    patience: int | None = None  # early stopping (004 §2.3): stop after this many epochs without a new best
    monitor: str = "acc"  # what "best" means for best.pth and early stopping: val "acc" or val "loss"
    informative_names: bool = False  # per-epoch files named epoch03-loss0.1820-acc0.9412.pth (004)
    plots: bool = True  # learning curves, confusion matrix and prediction grid in the run folder
    allow_pickle: bool = False  # --weights may be a whole pickled model (runs code from the file)
    progress: bool = True


    def make_quick(self) -> None:
        """`--quick`: a smoke run of seconds, 8 images per class, 64-pixel crops, 1 training epoch."""
        self.max_per_class, self.image_size, self.workers = 8, 64, 0
        self.epochs = self.epochs or 1


@dataclass
class RunResult:
    run_dir: Path
    history: History
    config: dict
    model: nn.Module
    classes: list[str]


def resolve(recipe: Recipe, opts: RunOptions) -> Recipe:
    """The recipe with the command line's overrides applied (`--epochs`, `--lr-scale`, ...)."""
    changes: dict = {"lrs": {g: lr * opts.lr_scale for g, lr in recipe.lrs.items()}}
    if opts.backbone:
        changes["backbone"] = opts.backbone
    if opts.weights:
        changes["weights"] = opts.weights
    if opts.epochs is not None:
        changes["train_epochs"] = opts.epochs
    if opts.batch_size is not None:
        changes["batch_size"] = opts.batch_size
    return dataclasses.replace(recipe, **changes)


def make_criterion(recipe: Recipe) -> nn.Module:
    return nn.BCEWithLogitsLoss() if recipe.loss == "bce_logit" else nn.CrossEntropyLoss()


# Options that may differ when a run is resumed: they cannot change what the run computes
# (a new total of --epochs only adds epochs). Every other option is restored from the
# checkpoint; giving it a different value is an error rather than silently ignored.
RESUME_SAFE = ("epochs", "device", "progress")


def resume_options(ckpt: dict, given: dict, source: Path) -> RunOptions:
    """The options of the run saved in `ckpt`, with the safe ones in `given` applied.

    `given` holds only what the user actually typed (as RunOptions fields). `data` may name
    another path to the same images (run() checks the files); anything else that differs
    from the saved run stops with a message, because it would change the result."""
    saved = dict(ckpt["config"]["options"])
    conflicts = [f"{k.replace('_', '-')} {v} (the run has {saved.get(k)})" for k, v in given.items()
                 if k not in (*RESUME_SAFE, "data") and _as_saved(v) != saved.get(k)]
    if conflicts:
        raise TLError(f"{source} continues a run with its own options; these would change its result: "
                      f"{'; '.join(conflicts)}.\n  Resume with only --epochs, --device or --no-progress, "
                      f"or start a new run with the new options")
    saved.update({k: v for k, v in given.items() if k in (*RESUME_SAFE, "data")})
    for key in ("data", "out"):
        saved[key] = Path(saved[key])
    return RunOptions(**saved)


def _as_saved(value):
    return str(value) if isinstance(value, Path) else value


def data_fingerprint(sets: dict) -> str:
    """A digest of which files (relative to their split folder), with which labels and sizes,
    each phase holds: the identity of the data a run trained on, wherever it lies."""
    h = hashlib.sha256()
    for phase in sorted(sets):
        ds = sets[phase]
        for path, target in ds.samples:
            h.update(f"{phase}|{os.path.relpath(path, ds.root)}|{target}|{os.path.getsize(path)}\n".encode())
    return h.hexdigest()


def make_run_dir(out: Path, name: str, explicit: bool) -> Path:
    """Create the run folder, atomically and for this run alone: `mkdir` fails if the name
    exists, so two runs started in the same second never share a folder. A generated name
    gets a suffix (-2, -3, ...); a name the caller chose is never reused."""
    out.mkdir(parents=True, exist_ok=True)
    for i in range(1, 1000):
        run_dir = out / (name if i == 1 else f"{name}-{i}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            if explicit:
                raise TLError(f"{run_dir} already exists; resume it with --resume {run_dir / 'last.ckpt'} "
                              f"or choose another --out") from None
    raise TLError(f"{out} already holds 999 runs named {name}-N; choose another --out")


def run(recipe: Recipe, build: BuildFn, opts: RunOptions, *, ckpt: dict | None = None, resume: Path | None = None,
        log: Callable[[str], None] = print) -> RunResult:
    """Run one experiment end to end and return its history (see the module docstring).

    With `ckpt` (a loaded `last.ckpt`, see `resume_run`), the run continues in that
    checkpoint's folder from the epoch after the one it saved. Everything the saved run
    had (weights, optimizer, scheduler, loss scaler, history, RNG states) is restored in
    one place, right after the model is built and before anything else uses the model,
    so the result equals an uninterrupted run.
    """
    recipe = resolve(recipe, opts)
    spec = get_backbone(recipe.backbone)
    device = resolve_device(opts.device)
    seed_everything(opts.seed)
    if device.type == "cuda":
        # fixed input sizes: let cuDNN time its algorithms once and keep the fastest (002 §1.4)
        torch.backends.cudnn.benchmark = True

    # 1. data: transforms with the backbone's own normalisation, one data set per phase
    transforms = build_transforms(spec.mean, spec.std, size=opts.image_size, augment=opts.augment)
    if opts.val_split:
        sets = split_datasets(opts.data, transforms, opts.val_split, split_seed=opts.split_seed,
                              max_per_class=opts.max_per_class, verify=opts.verify_images)
    else:
        sets = image_datasets(opts.data, transforms, max_per_class=opts.max_per_class, verify=opts.verify_images)
    if opts.train_per_class:  # data-efficiency studies: nested, class-balanced, drawn with split_seed
        keep_train_per_class(sets["train"], opts.train_per_class, opts.split_seed)
    classes = sets["train"].classes
    if report := describe_skipped(sets):
        log(report)
    if recipe.loss == "bce_logit" and len(classes) != 2:
        raise TLError(f"{recipe.name} has a single-logit head, which separates exactly 2 classes; "
                      f"{opts.data} has {len(classes)}: {classes}")
    fingerprint = data_fingerprint(sets)

    # 2. model: architecture + weights + new head, then the recipe decides what trains
    # (a resumed run gets its weights from the checkpoint, so it needs no pretrained file)
    model = create_model(recipe.backbone, 1 if recipe.loss == "bce_logit" else len(classes),
                         "none" if ckpt is not None else recipe.weights, stack=recipe.stack_head,
                         allow_pickle=opts.allow_pickle)
    model, optimizer, *rest = build(model, spec, recipe)  # a recipe may also return a scheduler
    scheduler = rest[0] if rest else None
    scaler = make_grad_scaler(device, opts.amp)
    generator = torch.Generator().manual_seed(opts.seed)  # the train loader's shuffling order
    history, start_epoch, wall_before = None, 0, 0.0
    if ckpt is not None:  # 3. resume: the one place a saved run is restored
        history, start_epoch, wall_before = _restore(ckpt, resume, model, optimizer, scheduler, scaler, generator,
                                                     classes, fingerprint, recipe.num_epochs)
    log(f"{recipe.name} ({recipe.source}) on {recipe.backbone}, weights={recipe.weights}: {recipe.strategy}")
    log(format_parameter_table(model, (1, 3, opts.image_size, opts.image_size)))

    # 4. inputs: stored features where a frozen prefix allows it (computed from the weights
    # just built or restored), else images
    net, cached, cache_mode = model, {}, "off"
    if opts.feature_cache:
        with torch.random.fork_rng(devices=[]):  # the cache's probe and passes draw nothing from the run's RNG
            net, cached, cache_mode = features.plan_cache(
                model, spec, sets, frozen_bn_eval=recipe.frozen_bn_eval, augment=opts.augment,
                views=opts.cache_views, seed=opts.seed, device=device, dtype=torch.float32,
                limit_gb=opts.cache_limit_gb, workers=opts.workers, channels_last=opts.channels_last, log=log)
    if opts.image_cache:
        sets = {p: ds if p in cached else decoded_images(ds, val_resize(opts.image_size), opts.cache_limit_gb, log)
                for p, ds in sets.items()}
    log(f"feature cache: {cache_mode}")
    loaders = make_loaders({p: cached.get(p, ds) for p, ds in sets.items()}, recipe.batch_size, seed=opts.seed,
                           workers=0 if len(cached) == len(sets) else opts.workers,
                           pin_memory=device.type == "cuda", generator=generator)

    # 5. the run folder and its record: created only now that everything can start
    if ckpt is not None:
        run_dir = Path(resume).parent
        checkpoint.remove_stale_temporaries(run_dir)  # a save killed mid-write left these
        config = ckpt["config"]
        config["resumed"] = [*config.get("resumed", []), {"after_epoch": ckpt["epoch"], "device": str(device),
                                                          "time": time.strftime("%Y-%m-%d %H:%M:%S")}]
        config["options"] = _options_record(opts)  # the new --epochs total, where the data lies now
        config["recipe"] = dataclasses.asdict(recipe)
        log(f"resuming {run_dir} after epoch {ckpt['epoch']}")
    else:
        name = opts.run_name or f"{recipe.name}-{recipe.backbone}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = make_run_dir(Path(opts.out), name, explicit=opts.run_name is not None)
        config = _config(recipe, opts, spec, device, model, optimizer, sets, classes) | {
            "data_fingerprint": fingerprint, "checksums": {}}
    config["train_epochs"] = recipe.train_epochs
    config["feature_cache"] = cache_mode
    _write_json(run_dir / "config.json", config)

    def save_weights(state: dict, name: str) -> None:
        checkpoint.atomic_save(state, run_dir / name)
        config["checksums"][name] = checkpoint.state_digest(state)  # --evaluate checks the file against it

    started = time.time()

    def on_epoch_end(epoch: int, hist: History) -> bool:
        # last.ckpt first: if the run is killed before best.pth is written, the checkpoint
        # already holds that epoch's weights, which resume uses as the best (see _restore)
        checkpoint.save_checkpoint(run_dir / "last.ckpt", epoch=epoch, model=model, optimizer=optimizer,
                                   scheduler=scheduler, scaler=scaler, history=hist.to_dict(), config=config,
                                   classes=classes, loader_generator=generator,
                                   wall_seconds=wall_before + time.time() - started)
        if hist.best_epoch == epoch:
            save_weights(hist.best_state, "best.pth")
        if opts.save_every_epoch:  # 001's 00.pth, 01.pth, ...; or 004's names that carry the val figures
            val = hist.rows[-1]
            name = (f"epoch{epoch:02d}-loss{val['loss']:.4f}-acc{val['acc']:.4f}.pth" if opts.informative_names
                    else f"{epoch:02d}.pth")
            save_weights(model.state_dict(), name)
        write_history_csv(hist, run_dir / "history.csv")
        _write_json(run_dir / "config.json", config)
        # early stopping (004 §2.3): no new best val `monitor` for `patience` epochs -> stop the loop
        return opts.patience is not None and epoch - hist.best_epoch >= opts.patience

    try:
        history = train_model(net, loaders, make_criterion(recipe), optimizer, recipe.num_epochs,
                              device=device, scheduler=scheduler, scaler=scaler,
                              frozen_bn_eval=recipe.frozen_bn_eval, start_epoch=start_epoch, history=history,
                              on_epoch_end=on_epoch_end, amp=opts.amp, channels_last=opts.channels_last,
                              best_by=opts.monitor, progress=opts.progress, log=log)
    except BaseException as exc:
        saved = (run_dir / "last.ckpt").exists()
        trained = saved and (ckpt is not None or checkpoint.load_checkpoint(run_dir / "last.ckpt")["epoch"] > 0)
        # a new run that failed before its first training epoch (a broken file, Ctrl-C) has nothing worth
        # keeping; a NaN loss keeps its last good checkpoint, which its message points to
        if not trained and not (saved and isinstance(exc, NonFiniteLoss)):
            shutil.rmtree(run_dir, ignore_errors=True)
        if isinstance(exc, KeyboardInterrupt):
            if not trained:
                raise TLError("interrupted before the first training epoch finished: nothing was saved") from None
            raise TLError(f"interrupted: {run_dir / 'last.ckpt'} holds the last completed epoch.\n"
                          f"  continue with: python main.py --resume {run_dir / 'last.ckpt'}") from None
        raise

    config["results"] = summarize(history) | {"wall_seconds": wall_before + time.time() - started}
    # 6. the headline number, never chosen on the images it is scored on (issue 14): the test
    # accuracy of the epoch chosen on val where there is a test/ split, else the final epoch's
    # val accuracy. Must run here, while `model` still holds the final epoch's weights.
    config["results"] |= score_headline(net, model, history, cached.get("val", sets["val"]), sets["val"],
                                        transforms, classes, opts, device, run_dir)
    _write_json(run_dir / "config.json", config)
    write_history_csv(history, run_dir / "history.csv")
    if history.best_state is not None:
        model.load_state_dict(history.best_state)  # hand back the best model, as 002's tutorial does
    if opts.plots:  # val scored on its stored features where they exist: the same numbers, no second pass
        write_run_plots(run_dir, history, net, cached.get("val", sets["val"]), sets["val"], classes, spec, device)
    res = config["results"]
    log(f"headline acc {res['headline_acc']:.4f} ({res['headline']}); best val acc {history.best_acc:.4f} "
        f"at epoch {history.best_epoch} (selected on val) -> {run_dir}")
    return RunResult(run_dir, history, config, model, classes)


def _restore(ckpt: dict, resume: Path, model: nn.Module, optimizer, scheduler, scaler, generator: torch.Generator,
             classes: list[str], fingerprint: str, num_epochs: int) -> tuple[History, int, float]:
    """Put a saved run back exactly as it was after its last epoch: weights, optimizer,
    scheduler, scaler, RNG states and history (with the best epoch's weights). Returns
    (history, first epoch to run, wall seconds already spent)."""
    config = ckpt["config"]
    if ckpt["classes"] != classes:
        raise TLError(f"{resume} was trained on classes {ckpt['classes']}, but the data has {classes}")
    if config.get("data_fingerprint") != fingerprint:
        raise TLError(f"{resume} was trained on other images than {config['options']['data']} holds now "
                      f"(files, labels or sizes differ); resume it on the data it started with")
    history = History.from_dict(ckpt["history"])
    if history.stopped_early is not None:
        raise TLError(f"{resume}: the run stopped early after epoch {history.stopped_early} (--patience); "
                      f"there is nothing to resume")
    start_epoch = ckpt["epoch"] + 1
    if start_epoch >= num_epochs:
        raise TLError(f"{resume} has already trained all {num_epochs - 1} epochs; "
                      f"pass a larger --epochs (the new total) to train more")
    checkpoint.load_into(model, ckpt["model"], str(resume))
    optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt["scheduler"] is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt["scaler"] is not None:
        scaler.load_state_dict(ckpt["scaler"])
    if history.best_epoch == ckpt["epoch"]:
        history.best_state = ckpt["model"]  # the checkpoint's own weights are that epoch's (on_epoch_end)
    elif history.best_epoch >= 0:
        best_path = resume.parent / "best.pth"
        history.best_state = checkpoint.load_state_file(best_path)
        checkpoint.verify_state_file(best_path, history.best_state, config.get("checksums", {}).get("best.pth"))
    checkpoint.set_rng_state(ckpt["rng"], generator)
    return history, start_epoch, ckpt["wall_seconds"]


def resume_run(path: Path, given: dict, log: Callable[[str], None] = print) -> RunResult:
    """`main.py --resume last.ckpt`: rebuild the saved run's recipe and options, then `run` it."""
    from experiments import get_experiment

    ckpt = checkpoint.load_checkpoint(path)
    opts = resume_options(ckpt, given, path)
    module = get_experiment(ckpt["config"]["experiment"])
    return run(module.RECIPE, module.build, opts, ckpt=ckpt, resume=Path(path), log=log)


def score_headline(net: nn.Module, model: nn.Module, history: History, val_inputs, val_set, transforms: dict,
                   classes: list[str], opts: RunOptions, device: torch.device, run_dir: Path) -> dict:
    """The run's headline accuracy, scored on images that played no part in choosing it.

    The best val epoch is chosen on val, so its val accuracy flatters it (the maximum of
    noisy numbers). Two honest numbers instead:

    * a data folder with a `test/` split: the epoch chosen on val (best.pth, the one early
      stopping keeps) scored on test, which nothing has looked at;
    * no test split: the final epoch's val accuracy. The epoch count comes from the recipe's
      document, not from val, so nothing was selected on these images.

    `net` must still hold the final epoch's weights (the loop's own net: with cached val
    features it scores them, the same numbers as the loop's last val row). The per-image
    predictions go to `headline_predictions.csv` (path relative to the data folder, label,
    prediction), which a paired comparison of two recipes resamples (experiments/report.py).
    """
    from tl.evaluate import evaluate

    if (Path(opts.data) / "test").is_dir() and not opts.val_split:
        # (check_layout has already made sure test/ has the same class folders as train/)
        test = image_datasets(opts.data, transforms, max_per_class=opts.max_per_class, phases=("test",))["test"]
        if history.best_state is not None:
            model.load_state_dict(history.best_state)  # the best-on-val state that run() hands back too
        what, scored, inputs, images = "test, epoch chosen on val", model, test, test
    else:
        what, scored, inputs, images = "val, final epoch", net, val_inputs, val_set
    result = evaluate(scored, torch.utils.data.DataLoader(inputs, batch_size=32), device, len(classes))
    rows = [{"path": Path(os.path.relpath(path, opts.data)).as_posix(), "label": classes[label],
             "prediction": classes[p]} for (path, label), p in zip(images.samples, result["predictions"])]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["path", "label", "prediction"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    checkpoint.atomic_write_text(run_dir / "headline_predictions.csv", text.getvalue())
    acc = sum(r["label"] == r["prediction"] for r in rows) / len(rows)
    return {"headline": what, "headline_acc": acc, "test_acc": acc if what.startswith("test") else None}


def write_run_plots(run_dir: Path, history: History, model: nn.Module, val_inputs, val_set, classes: list[str],
                    spec: Backbone, device: torch.device) -> None:
    """The pictures of a finished run: learning curves, and the best model's confusion
    matrix, prediction grid (document 001, 5-26 to 5-29) and top losses on val.

    `val_inputs` is what the loop validated on (images, or their stored features when the
    run cached them); `val_set` holds the images the grid shows."""
    from tl import plots
    from tl.evaluate import evaluate

    plots.run_curves(history.rows, run_dir / "curves.png", title=run_dir.name)
    loader = torch.utils.data.DataLoader(val_inputs, batch_size=32)
    result = evaluate(model, loader, device, len(classes))
    plots.confusion_matrix_plot(result["confusion"], classes, run_dir / "confusion.png",
                                title=f"val, best epoch: accuracy {result['acc']:.3f}")
    plots.top_losses_plot(val_set, result["probabilities"], classes, run_dir / "top_losses.png", mean=spec.mean,
                          std=spec.std)  # the confidently wrong val images (fastai's plot_top_losses)
    step = max(1, len(val_set) // 16)  # 16 images spread over the classes (val is sorted by class)
    images, labels = zip(*(val_set[i] for i in range(0, len(val_set), step)[:16]))
    with torch.no_grad():
        preds = predictions(model.eval()(torch.stack(images).to(device))).tolist()
    titles = [f"{classes[p]} ({classes[t]})" for p, t in zip(preds, labels)]
    colours = ["green" if p == t else "red" for p, t in zip(preds, labels)]
    plots.image_grid(torch.stack(images), titles, run_dir / "predictions.png", mean=spec.mean, std=spec.std,
                     colors=colours, title="predicted (true), best epoch")


def summarize(history: History) -> dict:
    """The figures a comparison needs, computed from the history rows alone."""
    val = history.val()
    train = [r for r in history.rows if r["phase"] == "train"]
    seconds = sum(r["seconds"] for r in train)
    images = sum(r["images_per_s"] * r["seconds"] for r in train)
    return {
        "baseline_val_acc": val[0]["acc"] if val and val[0]["epoch"] == 0 else None,
        "best_val_acc": history.best_acc,
        "best_epoch": history.best_epoch,
        "final_val_acc": val[-1]["acc"] if val else None,
        "final_val_loss": val[-1]["loss"] if val else None,
        "train_seconds": seconds,
        "train_images_per_s": images / seconds if seconds else None,
        "stopped_early": history.stopped_early,
    }


def _config(recipe: Recipe, opts: RunOptions, spec: Backbone, device: torch.device, model: nn.Module,
            optimizer: torch.optim.Optimizer, sets: dict, classes: list[str]) -> dict:
    total = parameter_table(model)[-1]
    return {
        "experiment": recipe.name,
        "recipe": dataclasses.asdict(recipe),
        "options": _options_record(opts),
        "weights_kind": _weights_kind(recipe.weights, spec),
        "optimizer": type(optimizer).__name__,
        "param_groups": [{"name": g.get("name", str(i)), "lr": g["lr"],
                          "params": sum(p.numel() for p in g["params"])}
                         for i, g in enumerate(optimizer.param_groups)],
        "trainable_params": total["trainable"],
        "total_params": total["total"],
        "classes": classes,
        "dataset_sizes": {p: len(ds) for p, ds in sets.items()},
        "device": str(device),
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _options_record(opts: RunOptions) -> dict:
    return {k: _as_saved(v) for k, v in dataclasses.asdict(opts).items()}


def _weights_kind(weights: str, spec: Backbone) -> str:
    if weights == "imagenet":
        return "packaged" if spec.weights_source == "packaged" else "imagenet"
    return "none" if weights in ("none", None) else "file"


def write_history_csv(history: History, path: Path) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["epoch", "phase", "loss", "acc", "seconds", "images_per_s"],
                            extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history.rows)
    checkpoint.atomic_write_text(path, text.getvalue())


def _write_json(path: Path, obj: dict) -> None:
    checkpoint.atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")
