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
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tl import Interrupted, TLError, distributed, features
from tl.data import (
    DecodedImages,
    build_transforms,
    decoded_bytes,
    decoded_images,
    describe_skipped,
    image_datasets,
    keep_train_per_class,
    make_loaders,
    split_datasets,
    val_resize,
)
from tl.engine import checkpoint
from tl.loop import History, NonFiniteLoss, make_grad_scaler, predictions, resolve_device, seed_everything, train_model
from tl.models import Backbone, create_model, format_parameter_table, get_backbone, parameter_table
from tl.recipe import BuildFn, Recipe, make_criterion
from tl.stages import Span, as_stages, describe, place


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
    cache_limit_gb: float = 2.0  # memory for a cache: a larger feature cache stays on disk (mmap), no image cache
    image_cache: bool = False  # decode and resize every image once, keep uint8 tensors in memory
    device_images: bool = False  # with image_cache: those tensors live on the training device, augmented there
    patience: int | None = None  # early stopping (004 §2.3): stop after this many epochs without a new best
    monitor: str = "acc"  # what "best" means for best.pth and early stopping: val "acc" or val "loss"
    informative_names: bool = False  # per-epoch files named epoch03-loss0.1820-acc0.9412.pth (004)
    plots: bool = True  # learning curves, confusion matrix and prediction grid in the run folder
    allow_pickle: bool = False  # --weights may be a whole pickled model (runs code from the file)
    progress: bool = True
    sync_bn: bool = False  # under torchrun on GPUs: BatchNorm statistics over all processes' batches (SyncBatchNorm)


    def __post_init__(self) -> None:
        if self.device_images:
            # images on the device are transformed in the main process: no worker processes,
            # for the loop and for the feature pass alike (and config.json records that)
            self.image_cache, self.workers = True, 0

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
    if recipe.first_lrs is not None:
        changes["first_lrs"] = {g: lr * opts.lr_scale for g, lr in recipe.first_lrs.items()}
    if opts.backbone:
        changes["backbone"] = opts.backbone
    if opts.weights:
        changes["weights"] = opts.weights
    if opts.epochs is not None:
        changes["train_epochs"] = opts.epochs
    if opts.batch_size is not None:
        changes["batch_size"] = opts.batch_size
    return dataclasses.replace(recipe, **changes)


# Options that may differ when a run is resumed: they cannot change what the run computes
# (a new total of --epochs only adds epochs). Every other option is restored from the
# checkpoint; giving it a different value is an error rather than silently ignored.
RESUME_SAFE = ("epochs", "device", "progress")


def resume_options(ckpt: dict, given: dict, source: Path) -> RunOptions:
    """The options of the run saved in `ckpt`, with the safe ones in `given` applied.

    `given` holds only what the user actually typed (as RunOptions fields). `data` may name
    another path to the same images (run() checks the files); anything else that differs
    from the saved run stops with a message, because it would change the result."""
    # an option newer than the checkpoint had its default value in that run
    saved = {f.name: _as_saved(f.default) for f in dataclasses.fields(RunOptions)
             if f.default is not dataclasses.MISSING} | dict(ckpt["config"]["options"])
    conflicts = [f"{k.replace('_', '-')} {v} (the run has {saved.get(k)})" for k, v in given.items()
                 if k not in (*RESUME_SAFE, "data") and _as_saved(v) != saved.get(k)]
    if conflicts:
        raise TLError(f"{source} continues a run with its own options; these would change its result: "
                      f"{'; '.join(conflicts)}.\n  Resume with only --epochs, --device or --no-progress, "
                      f"or start a new run with the new options")
    saved.update({k: v for k, v in given.items() if k in (*RESUME_SAFE, "data")})
    for key in ("data", "out"):
        saved[key] = Path(saved[key])
    opts = RunOptions(**saved)
    # as saved, even where __post_init__ would now decide otherwise (a device_images run made through
    # the API before it forced workers 0 ran its feature pass with its workers): the run continues as it began
    opts.workers, opts.image_cache = saved["workers"], saved["image_cache"]
    return opts


def _as_saved(value):
    return str(value) if isinstance(value, Path) else value


def data_fingerprint(sets: dict) -> str:
    """A digest of which files (relative to their split folder), with which labels and which
    contents, each phase holds: the identity of the data a run trained on, wherever it lies.
    (Reading every file once costs about what one epoch's decoding does.)"""
    h = hashlib.sha256()
    for phase in sorted(sets):
        ds = sets[phase]
        for path, target in ds.samples:
            h.update(f"{phase}|{target}|".encode() + os.fsencode(os.path.relpath(path, ds.root)) + b"|")
            h.update(hashlib.sha256(Path(path).read_bytes()).digest())
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
    checkpoint's folder from the epoch after the one it saved. What the saved run had is
    restored right after the model is built and before anything else uses the model
    (`_restore`: weights, loss scaler, history, RNG states); the optimizer and scheduler
    belong to the stage the run was in and come back when that stage is set up
    (`_start_stage`). So the result equals an uninterrupted run.

    Under torchrun (tl/distributed.py) every process runs this function with the same
    options; the lines marked [DDP] make process 0 the only one that prints and writes (run
    folder, config, checkpoints, history, plots, the feature cache, which the others then
    load), wrap the net in DistributedDataParallel, and agree on the run folder.
    """
    log = log if distributed.is_main() else (lambda s: None)  # [DDP] one process speaks
    recipe = resolve(recipe, opts)
    spec = get_backbone(recipe.backbone)
    device = distributed.local_device(resolve_device(opts.device))  # [DDP] cuda:LOCAL_RANK under torchrun
    seed_everything(opts.seed)
    if device.type == "cuda":
        # fixed input sizes: let cuDNN time its algorithms once and keep the fastest (002 §1.4)
        torch.backends.cudnn.benchmark = True

    # 1. data: transforms with the backbone's own normalisation, one data set per phase
    transforms = build_transforms(spec.mean, spec.std, size=opts.image_size, augment=opts.augment,
                                  policy=recipe.augment)
    if opts.val_split:
        sets = split_datasets(opts.data, transforms, opts.val_split, split_seed=opts.split_seed,
                              max_per_class=opts.max_per_class, verify=opts.verify_images)
    else:
        # a test/ split is scanned now, with train and val: a broken or shared test file stops the run
        # before it trains, and test images are checked against train's like val's are
        phases = ("train", "val", "test") if (Path(opts.data) / "test").is_dir() else ("train", "val")
        sets = image_datasets(opts.data, transforms, max_per_class=opts.max_per_class, verify=opts.verify_images,
                              phases=phases)
    if opts.train_per_class:  # data-efficiency studies: nested, class-balanced, drawn with split_seed
        keep_train_per_class(sets["train"], opts.train_per_class, opts.split_seed)
    classes = sets["train"].classes
    if report := describe_skipped(sets):
        log(report)
    if recipe.loss == "bce_logit" and len(classes) != 2:
        raise TLError(f"{recipe.name} has a single-logit head, which separates exactly 2 classes; "
                      f"{opts.data} has {len(classes)}: {classes}")
    fingerprint = data_fingerprint(sets)
    test_set = sets.pop("test", None)  # scored once, after training (score_headline); the loop never sees it
    if opts.device_images:  # checked before any stage trains: a later stage may be the first to decode images
        # (without workers, decoding per epoch would be slower than not asking for the option at all)
        for ds in sets.values():
            if (needed := decoded_bytes(ds, val_resize(opts.image_size))) > opts.cache_limit_gb * 2**30:
                raise TLError(f"--device-images: the decoded images of {ds.root} need {needed / 2**30:.2f} GB, "
                              f"more than --cache-limit-gb {opts.cache_limit_gb}; raise --cache-limit-gb (they "
                              f"live in the device's memory) or leave out --device-images")

    # 2. model: architecture + weights + new head, then the recipe decides what trains
    # (a resumed run gets its weights from the checkpoint, so it needs no pretrained file)
    model = create_model(recipe.backbone, 1 if recipe.loss == "bce_logit" else len(classes),
                         "none" if ckpt is not None else recipe.weights, stack=recipe.stack_head,
                         allow_pickle=opts.allow_pickle)
    # one stage (an optimizer, maybe a scheduler) or several, each on its own epochs (tl/stages.py)
    model, stages = as_stages(build(model, spec, recipe))
    spans = place(stages, recipe.train_epochs)
    scaler = make_grad_scaler(device, opts.amp)
    generator = torch.Generator().manual_seed(opts.seed)  # the train loader's shuffling order
    history, start_epoch, wall_before = None, 0, 0.0
    if ckpt is not None:  # 3. resume: the one place a saved run is restored (its optimizer: in _start_stage)
        history, start_epoch, wall_before = _restore(ckpt, resume, model, scaler, generator, classes, fingerprint,
                                                     recipe.num_epochs)
    spans = [span for span in spans if span.end > start_epoch]  # the stages still to run
    log(f"{recipe.name} ({recipe.source}) on {recipe.backbone}, weights={recipe.weights}: {recipe.strategy}")

    # 4. the first stage to run: what trains and its optimizer; inputs: stored features where a
    # frozen prefix allows it (computed from the weights just built or restored), else images
    decoded: dict = {}  # --image-cache: decoded images per phase, shared by the stages
    optimizer, scheduler, net, cached, loaders, cache_mode = _start_stage(
        spans[0], model, spec, recipe, sets, decoded, opts, device, generator, ckpt, log)
    log(format_parameter_table(model, (1, 3, opts.image_size, opts.image_size)))

    # 5. the run folder and its record: created only now that everything can start
    if ckpt is not None:
        run_dir = Path(resume).parent
        if distributed.is_main():  # [DDP]
            checkpoint.remove_stale_temporaries(run_dir)  # a save killed mid-write left these
            for name, state in _files_of_saved_epoch(ckpt, history, opts).items():
                checkpoint.atomic_save(state, run_dir / name)  # a kill after last.ckpt may have cut these off
        config = ckpt["config"]
        config["resumed"] = [*config.get("resumed", []), {"after_epoch": ckpt["epoch"], "device": str(device),
                                                          "time": time.strftime("%Y-%m-%d %H:%M:%S")}]
        config["options"] = _options_record(opts)  # the new --epochs total, where the data lies now
        config["recipe"] = dataclasses.asdict(recipe)
        log(f"resuming {run_dir} after epoch {ckpt['epoch']}")
    else:
        name = opts.run_name or f"{recipe.name}-{recipe.backbone}-{time.strftime('%Y%m%d-%H%M%S')}"
        # [DDP] process 0 makes the folder, the others take its name
        run_dir = distributed.from_main(make_run_dir(Path(opts.out), name, explicit=opts.run_name is not None)
                                        if distributed.is_main() else None)
        config = _config(recipe, opts, spec, device, model, optimizer, sets, classes) | {
            "data_fingerprint": fingerprint, "checksums": {}}
    config["train_epochs"] = recipe.train_epochs
    _record_stage(config, spans[0], optimizer, scheduler, cache_mode, staged=len(stages) > 1,
                  cached_phases=sorted(cached))
    config["world_size"] = distributed.world_size()  # processes; each trains on batch_size images per step
    if distributed.is_main():  # [DDP]
        _write_json(run_dir / "config.json", config)

    started = time.time()

    def on_epoch_end(epoch: int, hist: History) -> bool:
        if not distributed.is_main():  # [DDP] only process 0 writes; the rows, so the stop, are the same on all
            return opts.patience is not None and epoch - hist.best_epoch >= opts.patience
        files = {}  # weight files of this epoch: best.pth, and 001's / 004's per-epoch files
        if hist.best_epoch == epoch:
            files["best.pth"] = hist.best_state
        if opts.save_every_epoch:
            files[epoch_file_name(epoch, hist.rows[-1], opts.informative_names)] = model.state_dict()
        for name, state in files.items():  # their digests first: the checkpoint's config carries them
            config["checksums"][name] = checkpoint.state_digest(state)
        # last.ckpt before the files: if the run is killed in between, the checkpoint already holds
        # this epoch's weights, and resume writes the files again from it (see run's resume step)
        checkpoint.save_checkpoint(run_dir / "last.ckpt", epoch=epoch, model=model, optimizer=optimizer,
                                   scheduler=scheduler, scaler=scaler, history=hist.to_dict(), config=config,
                                   classes=classes, loader_generator=generator,
                                   stage={"index": span.index, "end": span.end},
                                   wall_seconds=wall_before + time.time() - started)
        for name, state in files.items():
            checkpoint.atomic_save(state, run_dir / name)
        write_history_csv(hist, run_dir / "history.csv")
        _write_json(run_dir / "config.json", config)
        # early stopping (004 §2.3): no new best val `monitor` for `patience` epochs -> stop the loop
        return opts.patience is not None and epoch - hist.best_epoch >= opts.patience

    try:
        # the one loop, once per stage, on one History (on_epoch_end saves the current stage's optimizer)
        for i, span in enumerate(spans):
            if i > 0:  # a new stage: its own trainable set and fresh optimizer; inputs replanned for it
                optimizer, scheduler, net, cached, loaders, cache_mode = _start_stage(
                    span, model, spec, recipe, sets, decoded, opts, device, generator, None, log)
                _record_stage(config, span, optimizer, scheduler, cache_mode, staged=True, cached_phases=sorted(cached))
            stage = span.stage
            history = train_model(net, loaders, make_criterion(recipe), optimizer, span.end, device=device,
                                  scheduler=scheduler, scheduler_interval=stage.interval, scaler=scaler,
                                  frozen_bn_eval=_either(stage.frozen_bn_eval, recipe.frozen_bn_eval),
                                  bn_eval=_either(stage.bn_eval, recipe.bn_eval),
                                  start_epoch=max(start_epoch, span.start), history=history,
                                  on_epoch_end=on_epoch_end, amp=opts.amp, channels_last=opts.channels_last,
                                  best_by=opts.monitor, progress=opts.progress, log=log)
            if history.stopped_early is not None:
                break
    except BaseException as exc:
        if not distributed.is_main():  # [DDP] process 0 alone tidies the run folder
            raise
        saved = (run_dir / "last.ckpt").exists()
        trained = saved and (ckpt is not None or checkpoint.load_checkpoint(run_dir / "last.ckpt")["epoch"] > 0)
        # a new run that failed before its first training epoch (a broken file, Ctrl-C) has nothing worth
        # keeping; a NaN loss keeps its last good checkpoint, which its message points to
        if not trained and not (saved and isinstance(exc, NonFiniteLoss)):
            shutil.rmtree(run_dir, ignore_errors=True)
        if isinstance(exc, KeyboardInterrupt):
            if not trained:
                raise Interrupted("interrupted before the first training epoch finished: nothing was saved") from None
            raise Interrupted(f"interrupted: {run_dir / 'last.ckpt'} holds the last completed epoch.\n"
                              f"  continue with: python main.py --resume {run_dir / 'last.ckpt'}") from None
        raise

    if not distributed.is_main():  # [DDP] the others have trained their share; process 0 scores and writes
        return RunResult(run_dir, history, config, model, classes)
    net = distributed.unwrap(net)  # [DDP] scoring below is one process on all of val: no DDP wrapper
    config["results"] = summarize(history) | {"wall_seconds": wall_before + time.time() - started}
    # 6. the headline number, never chosen on the images it is scored on (issue 14): the test
    # accuracy of the epoch chosen on val where there is a test/ split, else the final epoch's
    # val accuracy. Must run here, while `model` still holds the final epoch's weights.
    config["results"] |= score_headline(net, model, history, cached.get("val", sets["val"]), sets["val"],
                                        test_set, classes, opts, device, run_dir)
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


def _restore(ckpt: dict, resume: Path, model: nn.Module, scaler, generator: torch.Generator,
             classes: list[str], fingerprint: str, num_epochs: int) -> tuple[History, int, float]:
    """Put a saved run back exactly as it was after its last epoch: weights, scaler, RNG
    states and history (with the best epoch's weights). Returns (history, first epoch to
    run, wall seconds already spent). The optimizer and scheduler belong to a stage: they
    come back when that stage starts (`_start_stage`)."""
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
    if config.get("world_size", 1) != distributed.world_size():  # [DDP] shards and batches depend on it
        raise TLError(f"{resume} was trained by {config.get('world_size', 1)} process(es), this is "
                      f"{distributed.world_size()}: resume it with the same torchrun --nproc_per_node x --nnodes")
    start_epoch = ckpt["epoch"] + 1
    if start_epoch >= num_epochs:
        raise TLError(f"{resume} has already trained all {num_epochs - 1} epochs; "
                      f"pass a larger --epochs (the new total) to train more")
    checkpoint.load_into(model, ckpt["model"], str(resume))
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


def epoch_file_name(epoch: int, val_row: dict, informative: bool) -> str:
    """001's `03.pth`, or 004's name that carries the val figures, `epoch03-loss0.1820-acc0.9412.pth`."""
    return (f"epoch{epoch:02d}-loss{val_row['loss']:.4f}-acc{val_row['acc']:.4f}.pth" if informative
            else f"{epoch:02d}.pth")


def _files_of_saved_epoch(ckpt: dict, history: History, opts: RunOptions) -> dict:
    """The weight files the run wrote right after its checkpoint's epoch: all equal to the
    checkpoint's own weights."""
    files = {}
    if history.best_epoch == ckpt["epoch"]:
        files["best.pth"] = ckpt["model"]
    if opts.save_every_epoch:
        files[epoch_file_name(ckpt["epoch"], history.rows[-1], opts.informative_names)] = ckpt["model"]
    return files


def _start_stage(span: Span, model: nn.Module, spec: Backbone, recipe: Recipe, sets: dict, decoded: dict,
                 opts: RunOptions, device: torch.device, generator: torch.Generator, ckpt: dict | None, log):
    """Set up one stage just before it trains: what trains and its optimizer (the stage's
    `setup`), the loop's inputs (stored features where this stage's frozen prefix makes them
    exact, else images) and its schedule, which needs the number of batches per epoch. A
    run resumed inside this stage gets its optimizer and scheduler state back; one resumed
    at the boundary starts the stage fresh, as the uninterrupted run did.

    Returns (optimizer, scheduler, net, cached features, loaders, cache mode)."""
    stage = span.stage
    log(f"stage {span.index + 1}: {stage.name}, training epochs {max(span.start, 1)}..{span.end - 1}")
    optimizer = stage.setup(model, spec, recipe)
    net, cached, cache_mode = model, {}, "off"
    saved = ckpt.get("stage", {"index": 0, "end": None}) if ckpt is not None else None
    resumed_inside = saved is not None and saved["index"] == span.index
    saved_stage = next((s for s in ckpt["config"].get("stages", []) if s["index"] == span.index),
                       {}) if resumed_inside else {}
    saved_mode = saved_stage.get("feature_cache", ckpt["config"].get("feature_cache")) if resumed_inside else None
    if resumed_inside and str(saved_mode).startswith("off"):
        # the stage trained uncached before the interruption (for whatever reason: a full disk,
        # say), so its rest does too: the cache's folded BatchNorm differs in the last float bits
        cache_mode = saved_mode
    elif opts.feature_cache:
        # [DDP] process 0 computes and stores the features first; the others wait, then load them.
        # fork_rng: the cache's probe and passes draw nothing from the run's RNG
        with distributed.main_first(), torch.random.fork_rng(devices=[]):
            net, cached, cache_mode = features.plan_cache(
                model, spec, sets, frozen_bn_eval=_either(stage.frozen_bn_eval, recipe.frozen_bn_eval)
                or _either(stage.bn_eval, recipe.bn_eval), augment=opts.augment,
                views=opts.cache_views, seed=opts.seed, device=device, dtype=torch.float32,
                limit_gb=opts.cache_limit_gb, workers=opts.workers, channels_last=opts.channels_last, log=log)
        main_mode = distributed.from_main(cache_mode)  # [DDP] process 0's decision; ours otherwise
        if main_mode.startswith("off") and not cache_mode.startswith("off"):
            # process 0 trains uncached (its disk had no room, say): so does every process
            net, cached, cache_mode = model, {}, main_mode
        elif _plain(main_mode) != _plain(cache_mode):
            log(f"warning: process 0 trains with the feature cache '{main_mode}', this process with '{cache_mode}'")
        if "cached_phases" in saved_stage and set(cached) - set(saved_stage["cached_phases"]):
            # a phase this stage trained uncached before the interruption (no disk room for it, say) stays so
            cached = {p: fs for p, fs in cached.items() if p in saved_stage["cached_phases"]}
            net, cache_mode = (net if cached else model), saved_mode
    if opts.image_cache or opts.device_images:
        for p, ds in sets.items():
            if p not in cached and p not in decoded:
                decoded[p] = decoded_images(ds, val_resize(opts.image_size), opts.cache_limit_gb, log,
                                            device=device if opts.device_images else None)
    log(f"feature cache: {cache_mode}")
    if resumed_inside and saved_mode is not None and _plain(saved_mode) != _plain(cache_mode):
        log(f"warning: before the interruption this stage trained with the feature cache '{saved_mode}', now "
            f"'{cache_mode}'; the rest of the run may differ from an uninterrupted one in the last float bits")
    inputs = {p: cached.get(p, decoded.get(p, ds)) for p, ds in sets.items()}
    # images already on the device are transformed in this process and need no pinned copy
    on_device = opts.device_images and any(isinstance(ds, DecodedImages) for ds in inputs.values())
    loaders = make_loaders(inputs, recipe.batch_size, seed=opts.seed,
                           workers=0 if len(cached) == len(sets) or on_device else opts.workers,
                           pin_memory=device.type == "cuda" and not on_device, generator=generator)
    if distributed.is_distributed():  # [DDP] on its device and layout first: DDP copies process 0's weights to all;
        # a new DDP wrapper per stage, since it records which parameters train when it is made
        net.to(device, memory_format=torch.channels_last if opts.channels_last else torch.contiguous_format)
        net = distributed.wrap(net, device, opts.sync_bn)
    scheduler = stage.schedule(optimizer, span.epochs, len(loaders["train"])) if stage.schedule else None
    if resumed_inside:
        model.to(device)  # optimizer state is loaded onto its parameters' device: the one this run trains on
        if scheduler is not None and saved["end"] not in (None, span.end):
            raise TLError(f"this run's stage {stage.name!r} laid out its learning-rate schedule for training "
                          f"epochs up to {saved['end'] - 1}; resuming with another --epochs total would bend "
                          f"it. Resume with --epochs {recipe.train_epochs - span.end + saved['end']}")
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None and ckpt["scheduler"] is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
    return optimizer, scheduler, net, cached, loaders, cache_mode


def _plain(cache_mode: str) -> str:
    """A cache mode without where the cache lies: in memory or on disk, its numbers are the same."""
    return cache_mode.split(" (on disk")[0]


def _either(value, default):
    """A stage's own setting, or the recipe's where the stage leaves it open (None)."""
    return default if value is None else value


def _record_stage(config: dict, span: Span, optimizer, scheduler, cache_mode: str, staged: bool,
                  cached_phases: list[str]) -> None:
    """The stage that starts, in config.json: its epochs, rates, schedule and feature cache
    (and which phases it caches, so a resume inside it caches no other).
    A staged run's `feature_cache` and `trainable_params` then speak for all its stages."""
    entry = describe(span, optimizer, scheduler) | {"index": span.index, "feature_cache": cache_mode,
                                                    "cached_phases": cached_phases}
    config["stages"] = [s for s in config.get("stages", []) if s["index"] != span.index] + [entry]
    config["feature_cache"] = cache_mode
    if staged:
        config["feature_cache"] = "; ".join(f"{s['name']}: {s['feature_cache']}" for s in config["stages"])
        config["trainable_params"] = max(s["trainable_params"] for s in config["stages"])


def resume_run(path: Path, given: dict, log: Callable[[str], None] = print) -> RunResult:
    """`main.py --resume last.ckpt`: rebuild the saved run's recipe and options, then `run` it."""
    from experiments import get_experiment

    ckpt = checkpoint.load_checkpoint(path)
    opts = resume_options(ckpt, given, path)
    module = get_experiment(ckpt["config"]["experiment"])
    return run(module.RECIPE, module.build, opts, ckpt=ckpt, resume=Path(path), log=log)


def score_headline(net: nn.Module, model: nn.Module, history: History, val_inputs, val_set, test_set,
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
    from tl.engine.evaluate import evaluate

    if test_set is not None:  # scanned with train and val at the start of the run
        if history.best_state is not None:
            model.load_state_dict(history.best_state)  # the best-on-val state that run() hands back too
        what, scored, inputs, images = "test, epoch chosen on val", model, test_set, test_set
    else:
        what, scored, inputs, images = "val, final epoch", net, val_inputs, val_set
    result = evaluate(scored, torch.utils.data.DataLoader(inputs, batch_size=32), device, len(classes))
    rows = [{"path": Path(os.path.relpath(path, opts.data)).as_posix(), "label": classes[label],
             "prediction": classes[p]} for (path, label), p in zip(images.samples, result["predictions"])]
    _write_csv(run_dir / "headline_predictions.csv", ["path", "label", "prediction"], rows)
    acc = sum(r["label"] == r["prediction"] for r in rows) / len(rows)
    return {"headline": what, "headline_acc": acc, "test_acc": acc if what.startswith("test") else None}


def write_run_plots(run_dir: Path, history: History, model: nn.Module, val_inputs, val_set, classes: list[str],
                    spec: Backbone, device: torch.device) -> None:
    """The pictures of a finished run: learning curves, and the best model's confusion
    matrix, prediction grid (document 001, 5-26 to 5-29) and top losses on val.

    `val_inputs` is what the loop validated on (images, or their stored features when the
    run cached them); `val_set` holds the images the grid shows."""
    from tl.engine import plots
    from tl.engine.evaluate import evaluate

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
    _write_csv(path, ["epoch", "phase", "loss", "acc", "seconds", "images_per_s"], history.rows)


def _write_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    """The run folder's tables, written atomically like every file there (extra keys ignored)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    checkpoint.atomic_write_text(path, text.getvalue())


def _write_json(path: Path, obj: dict) -> None:
    checkpoint.atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")
