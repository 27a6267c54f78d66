"""The commands of main.py: one function per action of the command line.

main.py parses the arguments (build_parser), picks the action and turns errors into
messages and exit codes; each command here takes the parsed arguments and calls the
library (experiments/, tl/engine/, tl/) with plain values: paths, names, numbers.

    --list        list_recipes           --evaluate  evaluate_command
    --experiment  train_command          --predict   predict_command
    --resume      resume_command         --explain   explain_command
    --export      export_command         --prepare   prepare_command
    --show-data   show_data_command      --find-lr   find_lr_command

Every option that configures a run has the name of its RunOptions field as its argparse
dest (main.build_parser), so `run_options` copies them by name.

The library is imported inside each command, as it is needed: `main.py --help` and
`--list` stay quick, and no command pays for another's imports.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
from collections.abc import Callable
from pathlib import Path

from tl import TLError

# a command-line option that sets more RunOptions fields than its own (for --resume's check of
# what the user typed): --quick is RunOptions.make_quick, --device-images RunOptions.__post_init__
_ALSO_SETS = {"quick": ("max_per_class", "image_size", "workers"), "device_images": ("image_cache", "workers")}
# a RunOptions field that --resume neither compares with the saved run nor applies: --allow-pickle
# is about loading --weights files, and a resumed run takes its weights from the checkpoint
_NOT_COMPARED_ON_RESUME = {"allow_pickle"}


def _writes_into_run_folder(folder_of: Callable[[argparse.Namespace], Path | None]):
    """For a command that writes into a run's folder (a report, an export, maps): it runs only
    while no run writes that folder, and holds it meanwhile (tl/engine/run_folder.py
    `held_if_run_folder`); else it stops at once with one error naming the run's process.
    `folder_of(args)`: the folder the command writes into."""
    def wrap(command):
        @functools.wraps(command)
        def held(args: argparse.Namespace, *rest):
            from tl.engine.run_folder import held_if_run_folder

            with held_if_run_folder(folder_of(args)):
                return command(args, *rest)
        return held
    return wrap


def _folder_of(path: Path | None) -> Path | None:
    """The folder a path names, or the one a file lies in."""
    return None if path is None else path if path.is_dir() else path.parent


def list_recipes() -> str:
    """The README's recipe table (what trains, epochs, batch, learning rates, the command), then
    each backbone and whether it runs here without a network."""
    from experiments import NAMES, all_experiments, tuned_dir, tuned_files
    from tl.engine.backbones import backbone_spec
    from tl.engine.weights import runs_offline, torchvision_weights_file
    from tl.models import BACKBONES

    lines = [f"{'recipe':<17} {'from':<16} {'model':<21} {'epochs':>6} {'batch':>5}  learning rates"]
    for name, module in all_experiments().items():
        r = module.RECIPE
        lrs = ", ".join(f"{g} {lr:g}" for g, lr in r.lrs.items())
        if r.first_lrs:  # a staged recipe (tl/stages.py): its head-first stage, then the rest
            first = ", ".join(f"{g} {lr:g}" for g, lr in r.first_lrs.items())
            lrs = f"first {r.first_epochs} epoch(s): {first}; then {lrs}"
        model = f"{r.backbone}, {'ImageNet' if r.weights == 'imagenet' else 'random init'}"
        lines.append(f"{name:<17} {r.source:<16} {model:<21} {r.train_epochs:>6} {r.batch_size:>5}  {lrs}")
        lines.append(f"{'':<17} trains: {r.strategy}")
        offline = "needs no weights: runs offline" if r.weights != "imagenet" else "offline: add -b efficientnet_lite0"
        lines.append(f"{'':<17} command: python main.py -e {name}   ({offline})")
    tuned = [f"tuned_{name} ({', '.join(f'{d} with {b}' for d, b in files)})" for name in NAMES
             if (files := tuned_files(name))]
    lines.append(f"\ntuned recipes (python -m experiments.tune; --data and -b pick the numbers): "
                 f"{', '.join(tuned) or f'none in {tuned_dir()}'}")
    cache = torchvision_weights_file("resnet18")[1].parent
    lines.append(f"\nbackbones (any recipe takes --backbone NAME); ImageNet weights offline? (hub cache: {cache})")
    for name in BACKBONES:
        spec = backbone_spec(name)
        if spec.weights_source == "packaged":
            where = "yes: they ship in a pip package"
        elif runs_offline(spec):
            where = f"yes: {torchvision_weights_file(name)[1].name} is in the cache"
        else:
            where = f"no: needs the network once for {torchvision_weights_file(name)[1].name} (or --weights PATH)"
        lines.append(f"  {name:<19} {where}" + (f" ({spec.image_size}-pixel images)" if spec.image_size != 224 else ""))
    lines.append(f"  {'timm:NAME':<19} any timm model, e.g. timm:convnext_tiny: --weights PATH to its state_dict, "
                 f"or online --weights imagenet (timm downloads it)")
    return "\n".join(lines)


def run_options(args: argparse.Namespace):
    """The RunOptions of the command line. Each run option's dest is its RunOptions field, so
    the values are copied by name; an option left out (None) takes RunOptions' own default
    (--workers: 2). What is left is logic: --data resolved (the default folder, downloaded when
    online), --quick, and --device-images refusing --workers."""
    from tl.engine.options import RunOptions
    from tl.engine.prepare import resolve_data_dir

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunOptions) if hasattr(args, f.name)}
    values = {name: value for name, value in values.items() if value is not None}
    opts = RunOptions(**values | {"data": resolve_data_dir(args.data)})
    if args.quick:
        opts.make_quick()
        if args.max_per_class:  # an explicit --max-per-class wins over --quick's 8
            opts.max_per_class = args.max_per_class
        if args.workers is not None:  # and an explicit --workers over its 0
            opts.workers = args.workers
        if args.image_size is not None:  # and an explicit --image-size over its 64
            opts.image_size = args.image_size
    if args.device_images:
        if args.workers:
            raise TLError(f"--device-images transforms the images where they live, on the training device, in "
                          f"the main process: it cannot use --workers {args.workers}; leave --workers out")
    return opts  # (RunOptions itself turns --device-images into --image-cache --workers 0)


def train_command(args: argparse.Namespace):
    """`main.py --experiment NAME`: check what can be checked before any work (the names, the
    folders the run writes, the ImageNet weights), then train."""
    from tl.engine.ema import check_decay
    from tl.engine.run import run

    if args.ema is not None:  # (0, the recipe's "off", is refused too: to train without an average, leave --ema out)
        check_decay(args.ema, "--ema")
    module = _recipe_module(args)
    _check_before_work(args, module)
    return run(module.RECIPE, module.build, run_options(args))


def _recipe_module(args: argparse.Namespace):
    """The recipe module of `-e NAME`; the data folder's name and -b pick a tuned recipe's numbers
    (the folder itself is resolved, or downloaded, later)."""
    from experiments import get_experiment
    from tl.engine.prepare import DEFAULT_DATA_DIR

    data = args.data or os.environ.get("TL_DATA_DIR") or DEFAULT_DATA_DIR
    return get_experiment(args.experiment, data, args.backbone)


def _check_before_work(args: argparse.Namespace, module) -> None:
    """The names, the folders a run writes, the ImageNet weights: checked before any data is read."""
    from tl.engine.backbones import backbone_spec
    from tl.engine.weights import require_imagenet

    spec = backbone_spec(args.backbone or module.RECIPE.backbone)  # a typo fails here, before any data
    _check_writable(args.out, "--out")  # where the run will write, before any work
    if args.feature_cache:
        from tl.engine.feature_store import cache_dir

        _check_writable(cache_dir(), "feature cache folder (TL_CACHE_DIR)", "or pass --no-feature-cache")
    if (args.weights or module.RECIPE.weights) == "imagenet":
        require_imagenet(spec)  # weights before data: offline, this message comes first and no data/ is made


def find_lr_command(args: argparse.Namespace):
    """`main.py -e NAME --find-lr`: the learning-rate range test of the recipe's first stage
    (tl/engine/lr_finder.py), with the same checks as a training run before any work."""
    from tl.engine.lr_finder import find_lr

    if args.resume:
        raise TLError("--find-lr tests learning rates from the recipe's starting weights; it cannot continue a run "
                      "(--resume): use -e NAME --find-lr with the run's recipe and --backbone")
    if not args.experiment:
        raise TLError("--find-lr goes with --experiment NAME: the recipe whose learning rates it tests")
    module = _recipe_module(args)
    _check_before_work(args, module)
    return find_lr(module.RECIPE, module.build, run_options(args))


def resume_command(args: argparse.Namespace, given: set[str]):
    """Continue the run of a last.ckpt with its own saved options. Only --epochs (the new
    total), --device, --no-progress and --data (another path to the same images) may be
    given; any other option that would change the run is refused (tl.engine.resume.resume_options).

    `given`: the dests of the options the user typed (main.given_options)."""
    from experiments import get_experiment
    from tl.engine.options import RunOptions
    from tl.engine.run import resume_run

    args.data = args.data or "."  # without --data the saved path is used; nothing to resolve or download
    opts = run_options(args)
    typed = {field for name in given for field in (name, *_ALSO_SETS.get(name, ()))} - _NOT_COMPARED_ON_RESUME
    return resume_run(args.resume, {f.name: getattr(opts, f.name) for f in dataclasses.fields(RunOptions)
                                    if f.name in typed}, get_experiment)


@_writes_into_run_folder(lambda args: _folder_of(args.evaluate))
def evaluate_command(args: argparse.Namespace) -> None:
    """`main.py --evaluate PATH --data DIR [--split test]`: one file, or every epoch file in a folder; with
    the classification report of that file (of the final epoch's) in FOLDER/evaluate-<file>-<split>/.
    With test-time augmentation (the run's recorded recipe, unless --tta / --no-tta says otherwise) each
    photo is scored with its mirror, and the report goes to .../evaluate-<file>-<split>-tta/."""
    from tl.engine import evaluate as ev
    from tl.engine.class_names import one_line
    from tl.engine.device import resolve_device
    from tl.engine.model_loading import context_for, load_model
    from tl.engine.prepare import resolve_data_dir
    from tl.engine.tta import mirrored_if

    path: Path = args.evaluate
    if not path.exists():
        raise TLError(f"no such file or folder: {path}")
    ctx = context_for(path, args.backbone)
    if args.data is None and ctx.data is not None:
        print(one_line(f"data: {ctx.data} (from the run's config.json)"))
    ctx = dataclasses.replace(ctx, tta=_tta(ctx.tta, args.tta))
    loader, classes = ev.split_loader(resolve_data_dir(args.data or ctx.data), args.split, ctx)
    device = resolve_device(args.device)
    if path.is_file():
        model = mirrored_if(load_model(path, ctx, len(classes), args.allow_pickle), ctx.tta)
        result = ev.evaluate(model, loader, device, len(classes))
        print(ev.format_evaluation(result, classes))
        ev.write_evaluation_report(path.parent / f"evaluate-{path.stem}-{args.split}{'-tta' if ctx.tta else ''}",
                                   result, loader.dataset, classes)
        return
    ev.evaluate_folder(path, ctx, loader, classes, device, args.split, args.allow_pickle)


def predict_command(args: argparse.Namespace) -> int:
    """`main.py --predict IMG... [--checkpoint best.pth | model.onnx | model.pt]`; without a
    checkpoint, ImageNet names. An exported file (`--export`, tl/engine/export.py) carries its own
    class names, size and normalisation: no config.json is read. `--predict DIR`: a folder, sub-folders
    included, classified into a CSV table (`predict_folder_command`)."""
    from tl.engine.predict import predict_images

    if any(path.is_dir() for path in args.predict):
        if len(args.predict) > 1:
            raise TLError("--predict takes one folder alone (its sub-folders are included), or image files")
        return predict_folder_command(args)
    if args.csv:
        raise TLError("--csv names the table of --predict DIR, a folder: pass a folder, or leave out --csv")
    model, classes, mean, std, size = _prediction_model(args)
    return _print_predictions(args.predict, predict_images(model, args.predict, classes, mean, std, size))


def predict_folder_command(args: argparse.Namespace) -> int:
    """`main.py --predict DIR [--csv FILE]`: every image under DIR into one CSV table (tl/engine/predict.py);
    where the table goes is checked before any work, and an existing file is never written over."""
    from tl.data import build_transforms
    from tl.engine.device import resolve_device
    from tl.engine.predict import check_table_path, new_table_path, predict_folder

    if args.csv is not None:
        check_table_path(args.csv)
        _check_writable(args.csv.parent, "--csv folder")
        table = args.csv
    else:
        _check_writable(args.out, "--out")
        table = new_table_path(args.out)
    model, classes, mean, std, size = _prediction_model(args)
    transform = build_transforms(mean, std, size=size, augment=False)["val"]
    predict_folder(model, args.predict[0], table, classes, transform, batch_size=args.batch_size or 32,
                   device=resolve_device(args.device), workers=2 if args.workers is None else args.workers,
                   progress=args.progress)
    return 0


def _prediction_model(args: argparse.Namespace) -> tuple:
    """(model, class names, mean, std, image size) of --checkpoint: a run's weight file (with its
    config.json), an exported .onnx / .pt file alone, or, without one, the ImageNet classifier.
    Test-time augmentation (photo and mirror averaged) where the run's recipe recorded it or --tta
    asks; an exported file records no recipe, so there only --tta turns it on."""
    from tl.engine.backbones import backbone_spec
    from tl.engine.model_loading import ModelContext, context_for, load_model
    from tl.engine.tta import mirrored_if
    from tl.engine.weights import build_model, imagenet_categories

    if args.checkpoint and args.checkpoint.suffix in (".onnx", ".pt"):
        from tl.engine.export import load_exported

        model, meta = load_exported(args.checkpoint)  # the mirror: the session runs twice, on flipped images
        model = mirrored_if(model, _tta(False, args.tta))
        return model, meta["classes"], meta["mean"], meta["std"], meta["image_size"]
    if args.checkpoint:
        ctx = context_for(args.checkpoint, args.backbone)
        if ctx.classes is None:
            raise TLError(f"no config.json beside {args.checkpoint}, so its class names are unknown")
        model = mirrored_if(load_model(args.checkpoint, ctx, len(ctx.classes), args.allow_pickle),
                            _tta(ctx.tta, args.tta))
        classes = ctx.classes
    else:
        ctx = ModelContext(backbone=args.backbone or "efficientnet_lite0", classes=None)
        model = build_model(ctx.backbone, 1000, "imagenet")  # the untouched ImageNet classifier
        model = mirrored_if(model, _tta(False, args.tta))
        classes = imagenet_categories()
    spec = backbone_spec(ctx.backbone)
    return model, classes, spec.mean, spec.std, ctx.image_size


def _tta(recorded: bool, asked: bool | None) -> bool:
    """Test-time augmentation as --tta / --no-tta say, else as the run recorded it; said when on."""
    tta = recorded if asked is None else asked
    if tta:
        print("test-time augmentation: each photo and its left-right mirror, probabilities averaged")
    return tta


def _print_predictions(images: list[Path], results: list) -> int:
    from tl.engine.class_names import one_line

    failed = 0
    for path, result in results:
        if isinstance(result, str):
            print(one_line(f"skipped: {result}"))  # the one error: line, with the count, comes at the end
            failed += 1
        else:
            print(one_line(f"{path}: " + ", ".join(f"{name} {p:.3f}" for name, p in result)))
    if failed:
        raise TLError(f"{failed} of {len(images)} image(s) could not be read")
    return 0


@_writes_into_run_folder(lambda args: _folder_of(args.checkpoint))
def explain_command(args: argparse.Namespace) -> list:
    """`main.py --explain IMG... --checkpoint RUN/best.pth`: for each photo, the photo and its
    Grad-CAM for the predicted class, written to RUN/explain/<photo name>-cam.png."""
    from tl.data import build_transforms
    from tl.engine.backbones import backbone_spec
    from tl.engine.class_names import one_line
    from tl.engine.explain import class_activation_maps, mirrored_activation_maps
    from tl.engine.images import load_rgb
    from tl.engine.model_loading import context_for, load_model
    from tl.engine.plots import cam_figure

    if not args.checkpoint:
        raise TLError("--explain needs --checkpoint RUN/best.pth (the trained model whose attention to show)")
    if args.checkpoint.suffix in (".onnx", ".pt"):
        raise TLError(f"{args.checkpoint} is an exported file, which has no gradients to compute a map from: "
                      f"pass the run's best.pth")
    if not args.checkpoint.is_file():
        raise TLError(f"no such file: {args.checkpoint}")
    ctx = context_for(args.checkpoint, args.backbone)
    if ctx.classes is None:
        raise TLError(f"no config.json beside {args.checkpoint}, so its class names are unknown")
    model = load_model(args.checkpoint, ctx, len(ctx.classes), args.allow_pickle)
    spec = backbone_spec(ctx.backbone)
    transform = build_transforms(spec.mean, spec.std, size=ctx.image_size, augment=False)["val"]
    out_dir = Path(args.checkpoint).parent / "explain"
    cam = mirrored_activation_maps if _tta(ctx.tta, args.tta) else class_activation_maps
    written, failed = [], 0
    for path in args.explain:
        try:
            x = transform(load_rgb(path)).unsqueeze(0)  # (1, 3, H, W)
        except Exception as exc:
            print(one_line(f"skipped: cannot read {path}: {type(exc).__name__}: {exc}".splitlines()[0]))
            failed += 1
            continue
        maps, predicted, prob = cam(model, x)
        label = f"{ctx.classes[int(predicted[0])]} {float(prob[0]):.3f}"
        out = cam_figure(x, [("Grad-CAM", maps, [f"predicted: {label}"])], out_dir / f"{Path(path).stem}-cam.png",
                         mean=spec.mean, std=spec.std, photo_titles=[Path(path).name],
                         title="Grad-CAM for the predicted class (red: where its evidence lies)")
        print(one_line(f"{path}: predicted {label} -> {out}"))
        written.append(out)
    if failed:
        raise TLError(f"{failed} of {len(args.explain)} image(s) could not be read")
    return written


@_writes_into_run_folder(lambda args: _folder_of(args.export))
def export_command(args: argparse.Namespace):
    """`main.py --export RUN [--format onnx|torchscript]` (tl/engine/export.py)."""
    from tl.engine.export import export_run

    return export_run(args.export, args.format, data=args.data)


def prepare_command(args: argparse.Namespace) -> None:
    """`main.py --prepare dogs-vs-cats --src DIR --dest DIR`."""
    from tl.engine.prepare import prepare_dogs_vs_cats

    prepare_dogs_vs_cats(args.src, args.dest, force=args.force)


def show_data_command(args: argparse.Namespace) -> None:
    """`main.py --show-data`: augmentation.png and batch.png in OUT/data-preview/."""
    from tl.engine.plots import data_preview
    from tl.engine.prepare import resolve_data_dir

    _check_writable(args.out / "data-preview", "--out")
    for path in data_preview(resolve_data_dir(args.data), args.backbone or "resnet18", args.out / "data-preview",
                             seed=args.seed, val_split=args.val_split, split_seed=args.split_seed):
        print(f"wrote {path}")


def _check_writable(path: Path, what: str, alternative: str = "") -> None:
    """Stop before any work (and before a run folder exists) if `path` cannot be created or written.

    The nearest part of `path` that exists decides: it must be a folder this user may write to."""
    existing = Path(path).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    fix = f"choose another {what}" + (f" {alternative}" if alternative else "")
    if not existing.is_dir():
        raise TLError(f"{what} {path}: {existing} is a file, not a folder; {fix}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TLError(f"{what} {path}: cannot write in {existing} (no permission, or a read-only file system); {fix}")
