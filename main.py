"""The command line: pick a recipe, a data folder and a backbone; train, resume, evaluate, predict.

    python main.py --list
    python main.py --experiment vgg_finetune                      # online: ImageNet VGG16, hymenoptera
    python main.py --experiment resnet_frozen --backbone efficientnet_lite0 \\
                   --data ../shared/data/hymenoptera_data           # offline form used on this machine
    python main.py --resume runs/<run>/last.ckpt [--epochs N]
    python main.py --evaluate runs/<run>/best.pth --data DIR [--split test]
    python main.py --predict photo.jpg [--checkpoint runs/<run>/best.pth]
    python main.py --predict photos/ --checkpoint runs/<run>/best.pth [--csv table.csv]  # a folder -> CSV
    torchrun --standalone --nproc_per_node=2 main.py --experiment ...   # one process per GPU (tl/engine/distributed.py)
    python main.py --explain photo.jpg --checkpoint runs/<run>/best.pth   # Grad-CAM -> runs/<run>/explain/
    python main.py --export runs/<run> [--format onnx|torchscript]        # one self-describing file
    python main.py -e RECIPE --data DIR --find-lr   # learning-rate range test -> runs/lr-finder-.../
    python main.py --predict photo.jpg --checkpoint runs/<run>/model.onnx # no config.json needed

Problems with the input or the machine (unknown names, bad values, a missing or unreadable
folder, a damaged file, weights that are not on this machine, no permission, a full disk)
print one message, "error: ...", and exit with status 2. To see the Python traceback
behind such a message, run with TL_DEBUG=1. Ctrl-C exits with 130, the shell's status for
an interrupt, after saying where the run stopped and how to resume it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import commands
from tl.engine.command import command, say_error
from tl.engine.schema import OPTIONS


def _int_at_least(minimum: int, maximum: int | None = None):
    """An argparse type: a whole number >= minimum (and <= maximum), with a one-line message otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value

    return parse


_positive_int, _non_negative_int = _int_at_least(1), _int_at_least(0)


def _bounded(name: str, minimum: int | None = None):
    """An argparse type for the option `name`: the whole numbers tl/engine/schema.py allows it,
    the bounds its run's config.json is read with (from `minimum` where the command line asks more)."""
    bounds = OPTIONS[name]
    return _int_at_least(int(bounds.low if minimum is None else minimum), int(bounds.high))


_seed = _bounded("seed")  # 32 bits: NumPy's legacy seeding and PYTHONHASHSEED take no more


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.2, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (0.2 holds out a fifth), got {text}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _auto(text: str) -> str:
    if text != "auto":
        raise argparse.ArgumentTypeError(f"the one choice is 'auto' (inverse class frequency), got {text!r}")
    return text


def _class_fraction(text: str) -> tuple[str, float]:
    name, _, value = text.rpartition("=")
    try:
        fraction = float(value)
    except ValueError:
        fraction = None
    if not name or fraction is None or not 0 < fraction <= 1:
        raise argparse.ArgumentTypeError(f"expected CLASS=FRACTION, a fraction in (0, 1], e.g. cat=0.1; got {text!r}")
    return name, fraction


class _ClassFractions(argparse.Action):
    """`--train-fraction cat=0.1 dog=0.5` -> {"cat": 0.1, "dog": 0.5} (the RunOptions field)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, dict(values))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="main.py", description="Transfer learning recipes from the source documents, on one loop.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    what = p.add_argument_group("what to do (one of)")
    what.add_argument("--experiment", "-e", metavar="NAME", help="train one recipe (see --list)")
    what.add_argument("--list", action="store_true", help="list the recipes and backbones")
    what.add_argument("--resume", metavar="CKPT", type=Path, help="continue a run from its last.ckpt")
    what.add_argument("--evaluate", metavar="PATH", type=Path,
                      help="score a .pth/.ckpt file, or every epoch file in a run folder")
    what.add_argument("--predict", metavar="IMAGE", nargs="+", type=Path,
                      help="classify image file(s), or every image in a folder into a CSV table "
                           "(--checkpoint best.pth, or an exported .onnx / .pt)")
    what.add_argument("--explain", metavar="IMAGE", nargs="+", type=Path,
                      help="class-activation maps (Grad-CAM) of --checkpoint RUN/best.pth -> RUN/explain/")
    what.add_argument("--export", metavar="RUN", type=Path,
                      help="write RUN's best.pth as one self-describing file and check it on val (tl/engine/export.py)")
    what.add_argument("--prepare", choices=["dogs-vs-cats"],
                      help="split Kaggle's flat dogs-vs-cats train/ folder (--src) into --dest/{train,val,test}")
    what.add_argument("--show-data", action="store_true",
                      help="write augmentation.png and batch.png of the data set to OUT/data-preview/")
    what.add_argument("--find-lr", action="store_true",
                      help="with --experiment: the learning-rate range test on train (tl/engine/lr_finder.py) -> "
                           "OUT/lr-finder-<recipe>-<backbone>-<time>/ (a plot and a CSV); nothing is trained for keeps")

    data = p.add_argument_group("data")
    data.add_argument("--data", metavar="DIR", help="folder with train/ and val/ class folders "
                      "(default: $TL_DATA_DIR or data/hymenoptera_data, downloaded when online)")
    data.add_argument("--src", type=Path, help="with --prepare: the flat folder of cat.N.jpg / dog.N.jpg")
    data.add_argument("--dest", type=Path, help="with --prepare: where train/ val/ test/ are created")
    data.add_argument("--force", action="store_true", help="with --prepare: replace the splits in a non-empty --dest")
    data.add_argument("--val-split", type=_fraction, metavar="FRACTION",
                      help="data folder has only class folders: hold out this fraction per class as val")
    data.add_argument("--split-seed", type=_seed, default=0,
                      help="seed of the --val-split draw alone (default 0): --seed does not change the val set")
    data.add_argument("--max-per-class", type=_positive_int, metavar="N",
                      help="use only the first N images of each class in each split (--quick: 8)")
    data.add_argument("--train-per-class", type=_positive_int, metavar="N",
                      help="train on a seeded draw of N images per class (--split-seed; nested: the draw for N "
                           "is part of the draw for any larger N); val is untouched")
    data.add_argument("--follow-links", action="store_true",
                      help="include files reached through links that leave the data folder (reported either way)")
    data.add_argument("--train-fraction", nargs="+", type=_class_fraction, action=_ClassFractions,
                      metavar="CLASS=FRACTION", help="keep a seeded fraction of these classes' training images "
                      "(--split-seed), e.g. cat=0.1: unbalanced classes made on purpose; val and test are untouched")
    data.add_argument("--verify-images", action="store_true",
                      help="decode every image fully before training (finds truncated files; slower)")
    data.add_argument("--split", default="val", choices=["train", "val", "test"], help="split for --evaluate")
    data.add_argument("--image-size", type=_bounded("image_size", 16), metavar="N",
                      help="crop size in pixels (default: the backbone's own, 224 for most; --quick: 64)")
    data.add_argument("--no-augment", dest="augment", action="store_false",
                      help="train on the val transform (no random crop/flip)")
    data.add_argument("--workers", type=_non_negative_int,
                      help="DataLoader worker processes (default 2; 0 with --quick or --device-images)")

    model = p.add_argument_group("model and training")
    model.add_argument("--backbone", "-b", help="swap the recipe's architecture, keep its strategy")
    model.add_argument("--weights", help="imagenet | none | PATH to a state_dict (default: the recipe's)")
    model.add_argument("--checkpoint", type=Path, help="trained weights for --predict / --explain")
    model.add_argument("--format", choices=["onnx", "torchscript"], default="onnx",
                       help="with --export: the file format (default onnx)")
    model.add_argument("--allow-pickle", action="store_true",
                       help="allow loading whole pickled models (runs code from the file: trusted files only)")
    model.add_argument("--epochs", type=_bounded("epochs"), help="training epochs (the epoch-0 baseline is extra)")
    model.add_argument("--batch-size", type=_bounded("batch_size"))
    model.add_argument("--lr-scale", type=_positive_float, default=1.0, help="multiply every learning rate")
    model.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    model.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                       help="mixed precision on CUDA (bf16, or fp16 with a grad scaler)")
    model.add_argument("--seed", type=_seed, default=0, help="training seed, 0 .. 2**32-1 (default 0)")
    model.add_argument("--sync-bn", action="store_true",
                       help="under torchrun on GPUs: BatchNorm statistics over every process's batch")
    model.add_argument("--class-weights", type=_auto,
                       help="auto: weigh each class's loss by its inverse frequency in train (unbalanced classes; "
                            "pos_weight for a single logit)")
    model.add_argument("--balanced-sampler", action="store_true",
                       help="draw the training images with replacement so that every class is drawn equally often")
    model.add_argument("--ema", type=float, metavar="DECAY",
                       help="score val, keep best.pth and the headline with an exponential average of the weights, "
                            "updated after every step (0.99: about the last 100 steps; tl/engine/ema.py)")
    model.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                       help="test-time augmentation: the headline, --evaluate, --predict and --explain average each "
                            "photo's and its mirror's probabilities (default: the recipe's, or the run's config.json)")
    model.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help="NHWC memory layout (default by measurement: on for a CPU, off for CUDA; "
                            "results/benchmark.md, results/benchmark_cuda.md)")

    speed = p.add_argument_group("caches (tl/features.py, tl/engine/feature_store.py, tl/engine/image_cache.py)")
    speed.add_argument("--feature-cache", action=argparse.BooleanOptionalAction, default=True,
                       help="for frozen recipes, compute the frozen part once (default on where exact)")
    speed.add_argument("--cache-views", type=_non_negative_int, default=0,
                       help="with augmentation, precompute K augmented views per train image (default 0: val only)")
    speed.add_argument("--cache-limit-gb", type=_positive_float, default=2.0,
                       help="most memory a cache may take (default 2): a larger feature cache is kept on disk "
                            "and memory-mapped (same numbers), a larger --image-cache is not made")
    speed.add_argument("--image-cache", action="store_true",
                       help="decode and resize every image once and keep it in memory "
                            "(on a CPU with few cores, add --workers 0: results/benchmark.md)")
    speed.add_argument("--device-images", action="store_true",
                       help="--image-cache with the images on the training device (a GPU): crops, flips and "
                            "normalisation run there, no CPU workers (implies --image-cache --workers 0)")
    speed.add_argument("--compile", action="store_true",
                       help="torch.compile the network the loop trains (a GPU's speed; the first batches wait "
                            "for the compiler; checkpoints keep the plain module's names)")

    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("runs"), help="parent folder of run folders")
    out.add_argument("--csv", type=Path, metavar="FILE",
                     help="with --predict DIR: the table to write (default OUT/predictions-<time>.csv; "
                          "an existing file is never written over)")
    out.add_argument("--save-every-epoch", action="store_true", help="also write 00.pth, 01.pth, ... (001)")
    out.add_argument("--informative-names", action="store_true",
                     help="with --save-every-epoch: name files epoch03-loss0.1820-acc0.9412.pth (004)")
    model.add_argument("--patience", type=_bounded("patience"),
                       help="early stopping: stop after N epochs without a new best val --monitor (004 §2.3)")
    model.add_argument("--monitor", choices=["acc", "loss"], default="acc",
                       help="val metric that defines the best epoch (best.pth, early stopping)")
    out.add_argument("--quick", action="store_true",
                     help="smoke run: 8 images per class, 1 training epoch, 64-pixel images, no workers")
    out.add_argument("--tensorboard", action="store_true",
                     help="log loss and accuracy per epoch and every group's learning rate per step to "
                          "RUN/tensorboard/ (tensorboard --logdir runs)")
    out.add_argument("--no-progress", dest="progress", action="store_false",
                     help="no progress bars on stderr (training, the feature pass, the scan of the images, "
                          "--evaluate, --predict DIR)")
    return p


def given_options(argv: list[str] | None) -> set[str]:
    """The dests of the options the user typed (not those left at their default): for a run
    option, the name of its RunOptions field (commands.resume_command compares them with the run)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    """Under torchrun (WORLD_SIZE > 1) every process runs this with the same arguments; the
    process group is joined first and left last (tl/engine/distributed.py)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _main(argv)  # one process: nothing to join (and --help stays quick: no torch import)
    from tl.engine import distributed

    distributed.init_from_env()
    try:
        return _main(argv)
    finally:
        distributed.shutdown()


def torch_pair_problem() -> str | None:
    """Why torch and torchvision cannot work together here, or None: read from the installed
    packages' metadata before anything imports torchvision, whose import would otherwise fail
    deep inside with "operator torchvision::nms does not exist". torchvision 0.(N+15) goes with
    torch 2.N (0.29 with 2.14)."""
    from importlib import metadata

    try:
        torch_version, vision_version = metadata.version("torch"), metadata.version("torchvision")
    except metadata.PackageNotFoundError as exc:
        return f"{exc.name} is not installed: pip install -r requirements.txt (README: Setup)"
    major, minor = (int(x) for x in torch_version.split(".")[:2])
    vision_minor = int(vision_version.split(".")[1])
    if major == 2 and vision_minor != minor + 15:
        return (f"torchvision {vision_version} does not match torch {torch_version} (torch 2.{minor} needs "
                f"torchvision 0.{minor + 15}): pip install 'torchvision==0.{minor + 15}.*', or install the pair "
                f"again, e.g. pip install torch==2.14.1 torchvision==0.29.1 (README: Setup)")
    return None


def _main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (problem := torch_pair_problem()) is not None:
        say_error(problem)
        return 2
    actions = [a for a in ("experiment", "list", "resume", "evaluate", "predict", "explain", "export", "show_data",
                           "prepare") if getattr(args, a)]
    if len(actions) != 1:
        parser.error("choose exactly one of --experiment, --list, --resume, --evaluate, --predict, --explain, "
                     "--export, --show-data, --prepare")
    if args.prepare and not (args.src and args.dest):
        parser.error("--prepare needs --src DIR and --dest DIR")
    # the one wrapper every command shares (tl/engine/command.py): a TLError or an OSError is one
    # error: line and exit 2, Ctrl-C exit 130
    trains = (args.experiment or args.resume) and not args.find_lr  # a run says where training stopped itself
    return command(lambda: _dispatch(args, argv),
                   interrupted="interrupted before training started; no run folder or checkpoint was changed"
                   if trains else "interrupted", outputs=_outputs(args), argv=argv)


def _outputs(args: argparse.Namespace) -> str:
    """Where the user chooses this command's outputs: said when a write fails (tl/engine/command.py)."""
    if args.prepare:
        return "--dest"
    if args.resume:  # a run continues in its own folder
        return "copy the run folder to a writable disk and --resume the copy's last.ckpt"
    if args.evaluate or args.export or args.explain:  # they write into the run's folder
        return "copy the run folder to a writable disk and run the command on the copy"
    if args.predict:  # its one output: the table --csv names
        return "--csv"
    return "--out"


def _dispatch(args: argparse.Namespace, argv: list[str] | None) -> None:
    from tl.engine.progress import progress_shown

    with progress_shown(args.progress):  # --no-progress: every bar off (tl/engine/progress.py), the loop's too
        _command(args, argv)


def _command(args: argparse.Namespace, argv: list[str] | None) -> None:
    if args.find_lr:
        commands.find_lr_command(args)
    elif args.list:
        print(commands.list_recipes())
    elif args.experiment:
        commands.train_command(args)
    elif args.resume:
        commands.resume_command(args, given_options(argv))
    elif args.evaluate:
        commands.evaluate_command(args)
    elif args.predict:
        commands.predict_command(args)
    elif args.explain:
        commands.explain_command(args)
    elif args.export:
        commands.export_command(args)
    elif args.prepare:
        commands.prepare_command(args)
    elif args.show_data:
        commands.show_data_command(args)


if __name__ == "__main__":
    sys.exit(main())
