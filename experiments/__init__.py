"""The experiments: one short file per variant taught in the source documents.

Each file answers one question, names the document and section it reproduces, and
holds a `RECIPE` (the document's numbers) and a `build(model, spec, recipe)` that
decides what trains. `EXPERIMENTS` is the registry `main.py` and `compare_all` use.
"""

from __future__ import annotations

import importlib
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


def get_experiment(name: str) -> ModuleType:
    """The recipe module called `name` (it has RECIPE and build)."""
    if name not in NAMES:
        raise TLError(f"unknown experiment {name!r}; choose one of: {', '.join(NAMES)} (see --list)")
    return importlib.import_module(f"experiments.{name}")


def all_experiments() -> dict[str, ModuleType]:
    return {name: get_experiment(name) for name in NAMES}
