"""Rebuilding a saved model for --evaluate, --predict, --explain and --export: its architecture,
classes, input size and loss read from the run's config.json (`context_for`), its weights
checked against the digest the run recorded (`load_model`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from tl import TLError
from tl.engine.backbones import backbone_spec
from tl.engine.checkpoint import load_checkpoint, load_into, load_state_file, verify_state_file
from tl.engine.class_names import how_names_differ
from tl.engine.schema import CONFIG, check, loads
from tl.engine.weights import build_model


@dataclass
class ModelContext:
    """What is needed to rebuild a saved model: architecture, classes, input size, loss."""

    backbone: str
    classes: list[str] | None
    image_size: int | None = None  # None: the backbone's own (tl.models.Backbone.image_size)
    single_logit: bool = False
    stack_head: bool = False
    checksums: dict[str, str] | None = None  # digests of the weight files the run wrote (config.json)
    data: str | None = None  # the run's data folder, used when --data is not given
    val_split: float | None = None  # the run split a folder of class folders (--val-split) ...
    split_seed: int = 0  # ... with this seed: --evaluate rebuilds the same split
    train_per_class: int | None = None  # the run trained on this seeded draw per class (split_seed): --split train
    train_fraction: dict[str, float] | None = None  # ... and kept this seeded fraction of some classes
    max_per_class: int | None = None  # the run used only the first N images of each class (--quick)
    verify_images: bool = False  # the run decoded every image first and left out those that fail
    follow_links: bool = False  # the run included files reached through links that leave its data folder
    tta: bool = False  # the run's recipe scores each photo with its mirror (tl/engine/tta.py)

    def __post_init__(self) -> None:
        if self.image_size is None:
            self.image_size = backbone_spec(self.backbone).image_size


def context_for(path: Path, backbone: str | None) -> ModelContext:
    """Read the run's config.json beside `path` (or inside it, for a folder); else `--backbone`."""
    folder = path if path.is_dir() else path.parent
    config_file = folder / "config.json"
    if config_file.is_file():
        try:
            config = loads(config_file.read_text())
        except ValueError as exc:
            raise TLError(f"{config_file} is not a run config this project wrote (not JSON: {exc}); restore it "
                          f"from the run, or move it away and name the architecture with --backbone") from None
        # every field within the bounds of tl/engine/schema.py: one error: line per field that is not
        check(config, CONFIG, f"{config_file} is not a run config this project wrote: ")
        recipe, options = config["recipe"], config["options"]
        _check_against_checkpoint(config, folder / "last.ckpt", config_file)
        try:
            return ModelContext(backbone=backbone or recipe["backbone"], classes=list(config["classes"]),
                                image_size=options.get("image_size"),
                                single_logit=recipe.get("loss") == "bce_logit",
                                stack_head=bool(recipe.get("stack_head", False)), data=options.get("data"),
                                val_split=None if options.get("val_split") is None else float(options["val_split"]),
                                # runs saved before --split-seed drew the split with their training seed
                                split_seed=int(options.get("split_seed", options.get("seed", 0))),
                                train_per_class=options.get("train_per_class"),
                                train_fraction=options.get("train_fraction"),
                                max_per_class=options.get("max_per_class"),
                                verify_images=bool(options.get("verify_images", False)),
                                follow_links=bool(options.get("follow_links", False)),
                                tta=bool(recipe.get("tta", False)),
                                checksums=config.get("checksums", {}))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise TLError(f"{config_file} is not a run config this project wrote ({type(exc).__name__}: {exc}); "
                          f"restore it from the run, or move it away and name the architecture with --backbone") \
                from None
    if not backbone:
        raise TLError(f"no config.json beside {path}: say which architecture it is with --backbone")
    return ModelContext(backbone=backbone, classes=None)


# what a run fixes for good when it starts (--resume may change only epochs, device and the data's
# path) and what reading its model depends on: config.json must say what its last.ckpt says
FIXED = {"recipe": ("backbone", "loss", "stack_head", "tta"),
         "options": ("image_size", "val_split", "split_seed", "seed", "train_per_class", "train_fraction",
                     "max_per_class", "verify_images", "follow_links")}


def _check_against_checkpoint(config: dict, ckpt_file: Path, config_file: Path) -> None:
    """A TLError where config.json's class names are not, in order, those the run trained with,
    or where a field the run fixed (FIXED: its image size, backbone, ...) is not what its
    last.ckpt carries beside the weights: a model's outputs are in the trained order and its
    weights learnt at the trained size, so a config.json edited by hand (two names swapped, another
    size) would give wrong answers without a word. Without a last.ckpt that can be read,
    config.json is the only record there is."""
    if not ckpt_file.is_file():
        return
    try:
        ckpt = load_checkpoint(ckpt_file)
    except (TLError, OSError):
        return  # a damaged last.ckpt: --resume says so; the weights and config.json may still be whole
    saved = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    for section, keys in FIXED.items():
        mine, theirs = config.get(section) or {}, saved.get(section) or {}
        for key in keys:
            if key in theirs and mine.get(key) != theirs[key]:
                raise TLError(f"{config_file} says {section}.{key} = {mine.get(key)!r}, but the run trained with "
                              f"{theirs[key]!r} (as its {ckpt_file.name} records): restore config.json")
    classes, trained = config["classes"], ckpt.get("classes")
    if isinstance(trained, list) and trained != classes:
        raise TLError(f"{config_file} names the classes {classes}, but the run trained with {trained} (in that "
                      f"order, as its {ckpt_file.name} records): the model's outputs are in the trained order, so "
                      f"restore config.json's classes" + how_names_differ(classes, trained, "config.json",
                                                                          ckpt_file.name).replace("\n  ", "; "))


def load_model(path: Path, ctx: ModelContext, num_classes: int, allow_pickle: bool = False) -> nn.Module:
    model = build_model(ctx.backbone, 1 if ctx.single_logit else num_classes, "none", stack=ctx.stack_head)
    state = load_state_file(path, allow_pickle=allow_pickle)
    if path.suffix == ".pth":  # a weight file of a run: check it against the digest the run recorded
        verify_state_file(path, state, (ctx.checksums or {}).get(path.name))
    load_into(model, state, str(path))
    return model.eval()
