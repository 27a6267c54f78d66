"""The experiments: the recipes, their registry, and the studies that compare them.

experiments/recipes/ holds one short file per variant taught in the source documents
(a `RECIPE` and a `build(model, spec, recipe)`; see its `__init__`). This module is the
registry `main.py` and `compare_all` use: `NAMES`, and `get_experiment`, which loads
`experiments.recipes.<name>`. The other modules here are studies and harness scripts run
as `python -m experiments.<name>` (compare_all, report, tune, bn_policy, data_efficiency,
imbalance, look, lr_table); `experiments/common.py` holds the helpers they and
`benchmarks/` share.

`tuned_<recipe>` (e.g. tuned_modern_finetune) is a recipe with numbers chosen by a search
(experiments/tune.py) on one data set: the base recipe with the fields of
experiments/tuned/<recipe>-<data set>.json replaced (`$TL_TUNED_DIR` names another folder).
The file is chosen by the data folder's name; given no data folder, the recipe's one file.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

from tl import TLError

NAMES = (
    "resnet_scratch",
    "resnet_finetune",
    "resnet_frozen",
    "resnet_bn_only",
    "vgg_transfer",
    "vgg_finetune",
    "vgg_stacked",
    "tutorial_finetune",
    "tutorial_frozen",
    "two_stage",
    "modern_finetune",
)


def get_experiment(name: str, data: str | os.PathLike | None = None) -> ModuleType:
    """The recipe module called `name` (it has RECIPE and build); for tuned_<recipe>, the
    numbers tuned on the data set of the folder `data` (see the module docstring)."""
    if name.startswith("tuned_") and name[len("tuned_"):] in NAMES:
        return tuned_experiment(name[len("tuned_"):], data)
    if name not in NAMES:
        raise TLError(f"unknown experiment {name!r}; choose one of: {', '.join(NAMES)}, or tuned_<one of them> "
                      f"(see --list)")
    return importlib.import_module(f"experiments.recipes.{name}")


def tuned_dir() -> Path:
    return Path(os.environ.get("TL_TUNED_DIR") or Path(__file__).parent / "tuned")


def tuned_files(recipe: str) -> dict[str, Path]:
    """data set name -> the tuned file of `recipe` for it."""
    return {p.stem[len(recipe) + 1:]: p for p in sorted(tuned_dir().glob(f"{recipe}-*.json"))}


def tuned_experiment(recipe: str, data: str | os.PathLike | None) -> ModuleType:
    """A module like a recipe file's: the base recipe's build, RECIPE with the tuned numbers."""
    from tl.engine.tuning import tuned_recipe

    files = tuned_files(recipe)
    dataset = Path(data).resolve().name if data is not None else None
    if dataset is None and len(files) != 1:
        raise TLError(f"tuned_{recipe} has tuned files for {len(files)} data sets ({', '.join(files) or 'none'}) in "
                      f"{tuned_dir()}: name the data folder (--data)")
    dataset = dataset or next(iter(files))
    if dataset not in files:
        raise TLError(f"no numbers tuned for {recipe} on {dataset} in {tuned_dir()} (there are: "
                      f"{', '.join(files) or 'none'}); tune them with python -m experiments.tune --recipe {recipe} "
                      f"--data {data} --trials N")
    base = get_experiment(recipe)
    module = ModuleType(f"experiments.tuned_{recipe}", f"{recipe} with numbers tuned on {dataset}: {files[dataset]}")
    module.RECIPE, module.build = tuned_recipe(base.RECIPE, files[dataset]), base.build
    return module


def all_experiments() -> dict[str, ModuleType]:
    return {name: get_experiment(name) for name in NAMES}
