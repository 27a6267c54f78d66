"""One experiment = a Recipe (the numbers) + a build function (what trains) + `run`.

`run` does the same steps for every recipe, each a function with a name (below):
choose the images, build the model and its stages, restore a saved run, set up the
first stage, open the run folder, train stage by stage through the one loop
(tl/loop.py), and finish with the headline number and the pictures::

    runs/<experiment>-<backbone>-<YYYYmmdd-HHMMSS>/
        config.json    the resolved configuration and, at the end, the results
        history.csv    one row per (epoch, phase)
        best.pth       state_dict of the best validation epoch (with --ema: the average's, which val scored)
        last.ckpt      full training checkpoint after the latest epoch (--resume)
        headline_predictions.csv  per image: path, label, prediction of the headline model
                       (score_headline: test with the epoch chosen on val, else val's final epoch)
        classification_report.csv / .md, confused_pairs.csv  that model per class: precision, recall,
                       F1, support; macro-F1, balanced accuracy; the most-confused pairs and their files
        NN.pth         every epoch's state_dict, with --save-every-epoch (document 001)

Under torchrun (tl/engine/distributed.py) every process runs `run` with the same options; the
lines marked [DDP] make process 0 the only one that prints and writes (run folder,
config, checkpoints, history, plots, the feature cache, which the others then load),
wrap the net in DistributedDataParallel, and agree on the run folder.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tl import TLError
from tl.data import build_transforms, val_resize
from tl.engine import distributed, tensorboard
from tl.engine.backbones import backbone_spec
from tl.engine.balance import balance
from tl.engine.device import default_channels_last, device_hooks, make_grad_scaler, prepare_device, resolve_device
from tl.engine.ema import update_after_step, weight_average
from tl.engine.image_cache import decoded_bytes
from tl.engine.image_size import check_image_size
from tl.engine.options import RunOptions, resolve
from tl.engine.progress import progress_shown
from tl.engine.resume import restore, restore_threads, resume_options
from tl.engine.run_folder import RunFolder, data_fingerprint, resumed
from tl.engine.selection import ImageChoice, select_images
from tl.engine.stage_setup import StageSetup, stage_hooks, start_stage
from tl.engine.summary import format_parameter_table
from tl.engine.weights import build_model
from tl.loop import History, seed_everything, train_model
from tl.models import Backbone
from tl.recipe import BuildFn, Recipe, make_criterion
from tl.stages import as_stages, place


@dataclass
class RunResult:
    run_dir: Path
    history: History
    config: dict
    model: nn.Module
    classes: list[str]


@dataclass
class RunContext:
    """What the steps of one run share: filled in step by step."""

    recipe: Recipe
    spec: Backbone
    opts: RunOptions
    device: torch.device
    log: Callable[[str], None]
    sets: dict = field(default_factory=dict)  # phase -> data set the loop reads (train, val)
    test_set: object = None  # scored once, after training; the loop never sees it
    classes: list[str] = field(default_factory=list)
    fingerprint: str = ""
    model: nn.Module | None = None
    spans: list = field(default_factory=list)  # the stages still to run, each on its epochs
    staged: bool = False
    scaler: torch.amp.GradScaler | None = None
    generator: torch.Generator | None = None  # the train loader's shuffling order
    decoded: dict = field(default_factory=dict)  # --image-cache: decoded images per phase, shared by the stages
    history: History | None = None
    wall_before: float = 0.0  # training seconds of the run before a resume
    class_weights: torch.Tensor | None = None  # --class-weights auto: the loss's weight per class
    sample_weights: torch.Tensor | None = None  # --balanced-sampler: the train draw's weight per image
    ema: nn.Module | None = None  # --ema: the average of the weights that val scores (tl/engine/ema.py)
    on_epoch: Callable[[int, History], None] | None = None  # called after each epoch is saved (a pruner)
    results_only: bool = False  # a resumed run with every epoch trained: it only writes its results


def _bars_as_options(run_fn: Callable[..., RunResult]) -> Callable[..., RunResult]:
    """`run` with the machinery's progress bars (the scan, the feature pass, the image cache, the
    headline's scoring: tl/engine/progress.py) shown as its `opts.progress` says, as the loop's are."""

    @functools.wraps(run_fn)
    def run_with_bars(recipe: Recipe, build: BuildFn, opts: RunOptions, **kwargs) -> RunResult:
        with progress_shown(opts.progress):
            return run_fn(recipe, build, opts, **kwargs)

    return run_with_bars


@_bars_as_options
def run(recipe: Recipe, build: BuildFn, opts: RunOptions, *, ckpt: dict | None = None, resume: Path | None = None,
        log: Callable[[str], None] = print, on_epoch: Callable[[int, History], None] | None = None) -> RunResult:
    """Run one experiment end to end and return its history (see the module docstring).

    With `ckpt` (a loaded `last.ckpt`, see `resume_run`), the run continues in that
    checkpoint's folder from the epoch after the one it saved: what the saved run had is
    restored right after the model is built and before anything else uses the model, so
    the result equals an uninterrupted run. The folder must be the checkpoint's own, and is
    written by this process alone (tl/engine/run_folder.py: `resumed` holds it from before the
    checkpoint is read; `RunFolder.open` takes it where the caller did not).

    `on_epoch(epoch, history)` is called after each epoch, once the run folder has saved it;
    an exception it raises (a search's pruner: experiments/tune.py) ends the run there.
    """
    ctx = begin(recipe, opts, log)
    ctx.on_epoch = on_epoch
    choose_images(ctx)
    build_model_and_stages(ctx, build, resumed=ckpt is not None)
    if ckpt is not None:  # the one place a saved run is restored (its optimizer: in start_stage)
        restore_run(ctx, ckpt, resume)
    ctx.ema = weight_average(ctx.model, ctx.recipe.ema_decay, ckpt)  # --ema; None when off
    r = ctx.recipe  # said once the model is built (and a saved run restored: its refusals come first)
    ctx.log(f"{r.name} ({r.source}) on {r.backbone}, weights={r.weights}: {r.strategy}")
    first = start_stage(ctx.spans[0], ctx, ckpt)
    ctx.log(format_parameter_table(ctx.model, (1, 3, opts.image_size, opts.image_size)))
    with RunFolder.open(ctx, first, ckpt, resume) as folder:  # this process alone writes it until the run ends
        history = ctx.history if ctx.results_only else train_stages(ctx, first, folder, resumed=ckpt is not None)
        if distributed.is_main():  # [DDP] the others have trained their share; process 0 scores and writes
            folder.finish(ctx, history)
    return RunResult(folder.run_dir, history, folder.config, ctx.model, ctx.classes)


def begin(recipe: Recipe, opts: RunOptions, log: Callable[[str], None]) -> RunContext:
    """The recipe with the command line's overrides, its backbone, the image size, the device, the seed."""
    log = log if distributed.is_main() else (lambda s: None)  # [DDP] one process speaks
    recipe = resolve(recipe, opts)
    spec = backbone_spec(recipe.backbone)
    if opts.image_size is None:  # left out: the size the backbone's ImageNet weights were trained at (config.json
        opts.image_size = spec.image_size  # records it, so --evaluate, --predict and --export use it too)
    device = distributed.local_device(resolve_device(opts.device))  # [DDP] cuda:LOCAL_RANK under torchrun
    if distributed.is_distributed():  # [DDP] say so once: processes, backend, devices, batch per process
        log(distributed.describe(device, recipe.batch_size))
    if opts.channels_last is None:  # left out: the layout measured faster on this device (config.json records it)
        opts.channels_last = default_channels_last(device)
    seed_everything(opts.seed)
    prepare_device(device)  # CUDA: cuDNN picks the fastest algorithms for the fixed input sizes
    return RunContext(recipe, spec, opts, device, log)


def choose_images(ctx: RunContext, phases: tuple[str, ...] | None = None) -> None:
    """The run's images (`select_images`, the one function that chooses them), with the
    transforms of its backbone, and the checks that must stop a run before it trains.
    `phases`: the splits to read (default: train, val and test where it exists)."""
    opts, recipe = ctx.opts, ctx.recipe
    transforms = build_transforms(ctx.spec.mean, ctx.spec.std, size=opts.image_size, augment=opts.augment,
                                  policy=recipe.augment)
    # a test/ split is scanned now, with train and val: a broken or shared test file stops the run
    # before it trains, and test images are checked against train's like val's are
    sets = select_images(ImageChoice.of(opts), transforms, phases=phases, log=ctx.log)
    ctx.classes = sets["train"].classes
    if recipe.loss == "bce_logit" and len(ctx.classes) != 2:
        raise TLError(f"{recipe.name} has a single-logit head, which separates exactly 2 classes; "
                      f"{opts.data} has {len(ctx.classes)}: {ctx.classes}")
    ctx.class_weights, ctx.sample_weights = balance(opts, sets["train"].targets, ctx.classes, ctx.log)
    ctx.fingerprint = data_fingerprint(sets)
    ctx.test_set = sets.pop("test", None)
    ctx.sets = sets
    if opts.device_images:  # checked before any stage trains: a later stage may be the first to decode images
        # (without workers, decoding per epoch would be slower than not asking for the option at all)
        for ds in sets.values():
            if (needed := decoded_bytes(ds, val_resize(opts.image_size))) > opts.cache_limit_gb * 2**30:
                raise TLError(f"--device-images: the decoded images of {ds.root} need {needed / 2**30:.2f} GB, "
                              f"more than --cache-limit-gb {opts.cache_limit_gb}; raise --cache-limit-gb (they "
                              f"live in the device's memory) or leave out --device-images")


def build_model_and_stages(ctx: RunContext, build: BuildFn, resumed: bool) -> None:
    """Architecture + weights + new head, then the recipe decides what trains, in one stage
    or several (tl/stages.py). A resumed run gets its weights from the checkpoint, so it
    needs no pretrained file."""
    recipe = ctx.recipe
    model = build_model(recipe.backbone, 1 if recipe.loss == "bce_logit" else len(ctx.classes),
                        "none" if resumed else recipe.weights, stack=recipe.stack_head,
                        allow_pickle=ctx.opts.allow_pickle)
    check_image_size(model, ctx.spec, recipe.backbone, ctx.opts.image_size, None if resumed else ctx.sets.get("val"))
    ctx.model, stages = as_stages(build(model, ctx.spec, recipe))
    ctx.spans, ctx.staged = place(stages, recipe.train_epochs), len(stages) > 1
    ctx.scaler = make_grad_scaler(ctx.device, ctx.opts.amp)
    ctx.generator = torch.Generator().manual_seed(ctx.opts.seed)


def restore_run(ctx: RunContext, ckpt: dict, resume: Path) -> None:
    """The thread count, weights, loss scaler, history and RNG states as the saved run left
    them; the stages it finished are not run again, and a run with none left only writes its results."""
    ctx.history, start_epoch, ctx.wall_before = restore(ckpt, resume, ctx.model, ctx.scaler, ctx.generator,
                                                        ctx.classes, ctx.fingerprint, ctx.recipe.num_epochs,
                                                        str(ctx.opts.data))
    restore_threads(ckpt["config"], ctx.log)  # after the checks (a refused resume prints only its error),
    # before anything computes (the feature pass of the first stage)
    ctx.results_only = ctx.history.stopped_early is not None or start_epoch >= ctx.recipe.num_epochs
    if ctx.results_only:  # trained to the end and killed while writing its results: the last stage, set up to score
        ctx.log("every epoch of this run is trained; writing the results it was stopped before writing")
        ctx.spans = [span for span in ctx.spans if span.index == ckpt.get("stage", {}).get("index", 0)]
    else:
        ctx.spans = [span for span in ctx.spans if span.end > start_epoch]


def train_stages(ctx: RunContext, first: StageSetup, folder: RunFolder, resumed: bool) -> History:
    """The one loop, once per stage, on one History. A new stage gets its own trainable set and
    fresh optimizer, and its inputs are planned anew."""
    history, setup = ctx.history, first
    opts = ctx.opts
    ema_step = None if ctx.ema is None else update_after_step(ctx.ema, ctx.model)  # after each update
    run_hooks = dict(**device_hooks(ctx.device, opts.amp, opts.channels_last, ctx.scaler), best_by=opts.monitor,
                     progress=opts.progress, log=ctx.log,
                     end_of_epoch=combine(folder.end_of_epoch, ctx.on_epoch))  # the folder saves, then a pruner looks
    with folder.tidy_on_failure(resumed), tensorboard.opened(opts.tensorboard, folder.run_dir, history,
                                                             len(first.loaders["train"])) as board:
        for i, span in enumerate(ctx.spans):
            if i > 0:
                setup = start_stage(span, ctx, None)
                folder.record_stage(ctx, setup)
            folder.stage = setup  # whose optimizer and scheduler the checkpoints save
            if opts.compile:  # in place: the module's call is compiled, its state_dict keeps its plain names
                setup.net.compile()
            board.follow(setup.optimizer)  # --tensorboard: the rates of this stage's optimizer, per step
            hooks = dataclasses.replace(stage_hooks(span, ctx.recipe, setup.scheduler), **run_hooks,
                                        validate_with=setup.scored, after_step=combine(ema_step, board.after_step),
                                        end_of_phase=combine(board.end_of_phase))
            criterion = make_criterion(ctx.recipe, ctx.class_weights).to(ctx.device)
            history = train_model(setup.net, setup.loaders, criterion, setup.optimizer, span.end, ctx.device, history,
                                  hooks)
            if history.stopped_early is not None:
                break
    return history


def combine(*callbacks: Callable | None) -> Callable | None:
    """Several callbacks on one hook of the loop (tl/loop.py `Hooks`), which holds one callable:
    features that each want a say (TensorBoard logging, a learning-rate finder, an average of
    the weights, the run folder's saving) are combined here, so none of them needs to know the
    others, and the loop stays as it is.

    One callable that calls every given callback (None ones are left out) with the same
    arguments, in order, and returns True if any of them did ("stop"). Every callback is
    called each time, even after one asked to stop: a logger still records the last step.
    No callback at all gives None, the loop's "nothing to call"."""
    present = [c for c in callbacks if c is not None]
    if not present:
        return None
    if len(present) == 1:
        return present[0]

    def all_of(*args) -> bool:
        results = [c(*args) for c in present]  # a list, not any(...): no callback is skipped
        return any(bool(r) for r in results)

    return all_of


def resume_run(path: Path, given: dict, find_recipe: Callable[[str, Path, str], object],
               log: Callable[[str], None] = print) -> RunResult:
    """`main.py --resume last.ckpt`: rebuild the saved run's recipe and options, then `run` it.
    `find_recipe(name, data, backbone)` returns the recipe module (RECIPE, build):
    `experiments.get_experiment` (the data folder and the backbone pick a tuned recipe's numbers).

    The run folder is held from before the checkpoint is read to the end of the run (`resumed`):
    a second resume of the same run stops at once, naming this process, and a checkpoint that
    is not the folder's own is refused before anything is written."""
    with resumed(Path(path)) as ckpt:
        opts = resume_options(ckpt, given, path)
        module = find_recipe(ckpt["config"]["experiment"], opts.data, ckpt["config"]["recipe"]["backbone"])
        return run(module.RECIPE, module.build, opts, ckpt=ckpt, resume=Path(path), log=log)

