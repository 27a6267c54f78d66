"""The experiments: the recipes, their registry, and the studies that compare them.

experiments/recipes/ holds one short file per variant taught in the source documents
(a `RECIPE` and a `build(model, spec, recipe)`; see its `__init__`). This module is the
registry `main.py` and `compare_all` use: `NAMES`, and `get_experiment`, which loads
`experiments.recipes.<name>`. The other modules here are studies and harness scripts run
as `python -m experiments.<name>` (compare_all, report, tune, bn_policy, data_efficiency,
imbalance, look, lr_table); `experiments/common.py` holds the helpers they and
`benchmarks/` share.

`tuned_<recipe>` (e.g. tuned_modern_finetune) is a recipe with numbers chosen by a search
(experiments/tune.py) on one data set with one backbone: the base recipe with the fields of
experiments/tuned/<recipe>-<data set>-<backbone>.json replaced (`$TL_TUNED_DIR` names another
folder). `-e tuned_X --data D -b B` takes the file of D's folder name and B; without -b, the
backbone of the one file tuned on D (and that backbone). A backbone with no file of its own is
refused: numbers searched for one network are not claimed for another.
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


def get_experiment(name: str, data: str | os.PathLike | None = None, backbone: str | None = None) -> ModuleType:
    """The recipe module called `name` (it has RECIPE and build); for tuned_<recipe>, the
    numbers tuned on the data set of the folder `data` with `backbone` (see the module docstring)."""
    if name.startswith("tuned_") and name[len("tuned_"):] in NAMES:
        return tuned_experiment(name[len("tuned_"):], data, backbone)
    if name not in NAMES:
        raise TLError(f"unknown experiment {name!r}; choose one of: {', '.join(NAMES)}, or tuned_<one of them> "
                      f"(see --list)")
    return importlib.import_module(f"experiments.recipes.{name}")


def tuned_dir() -> Path:
    return Path(os.environ.get("TL_TUNED_DIR") or Path(__file__).parent / "tuned")


def tuned_file(recipe: str, dataset: str, backbone: str) -> Path:
    """Where the numbers of `recipe` tuned on `dataset` with `backbone` are (timm:NAME as timm-NAME)."""
    from tl.engine.backbones import folder_label

    return tuned_dir() / f"{recipe}-{dataset}-{folder_label(backbone)}.json"


def tuned_files(recipe: str) -> dict[tuple[str, str], Path]:
    """(data set, backbone) -> the tuned file of `recipe` for them: each file says its own in its
    fields, and only a file named after them counts."""
    from tl.engine.schema import loads  # the one reader of a hand-edited JSON file

    found = {}
    for path in sorted(tuned_dir().glob(f"{recipe}-*.json")):
        try:
            fields = loads(path.read_text())
            key = (fields["dataset"], fields["backbone"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a tuned file; naming it by its own path still gets its error (tuned_recipe)
        if tuned_file(recipe, *key) == path:
            found[key] = path
    return found


def tuned_experiment(recipe: str, data: str | os.PathLike | None, backbone: str | None) -> ModuleType:
    """A module like a recipe file's: the base recipe's build, RECIPE with the tuned numbers and
    the backbone they were tuned with."""
    from tl.engine.tuning import tuned_recipe

    files = tuned_files(recipe)
    datasets = sorted({d for d, _ in files})
    if data is None and len(datasets) != 1:
        raise TLError(f"tuned_{recipe} has tuned files for {len(datasets)} data sets ({', '.join(datasets) or 'none'}) "
                      f"in {tuned_dir()}: name the data folder (--data)")
    dataset = Path(data).resolve().name if data is not None else datasets[0]
    tuned_with = sorted(b for d, b in files if d == dataset)
    if backbone is None and len(tuned_with) > 1:
        raise TLError(f"tuned_{recipe} has numbers tuned on {dataset} for {', '.join(tuned_with)}: name one (-b)")
    backbone = backbone or (tuned_with[0] if tuned_with else get_experiment(recipe).RECIPE.backbone)
    if (dataset, backbone) not in files:
        there = ", ".join(f"{d} with {b}" for d, b in sorted(files)) or "none"
        raise TLError(f"no numbers tuned for {recipe} on {dataset} with {backbone} in {tuned_dir()} (there are: "
                      f"{there}); tune them with python -m experiments.tune --recipe {recipe} --data "
                      f"{data if data is not None else dataset} --backbone {backbone} --trials N")
    path = files[(dataset, backbone)]
    base = get_experiment(recipe)
    module = ModuleType(f"experiments.tuned_{recipe}", f"{recipe} with numbers tuned on {dataset} with {backbone}: "
                                                       f"{path}")
    module.RECIPE, module.build = tuned_recipe(base.RECIPE, path), base.build
    return module


def all_experiments() -> dict[str, ModuleType]:
    return {name: get_experiment(name) for name in NAMES}
