"""Every module of experiments/ (recipes included) and benchmarks/ imports, and so does every
project name they import inside a function: a script run by hand, seldom and on another
machine, must not be the first to find an import that a move or a rename broke. And the
helpers that studies and benchmarks share come from experiments/common.py, not from another
study."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("experiments", "benchmarks")


def _module_names() -> list[str]:
    names = []
    for folder in FOLDERS:
        for f in sorted((ROOT / folder).rglob("*.py")):
            parts = f.relative_to(ROOT).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


MODULES = _module_names()


def test_the_list_reaches_the_recipes_and_the_benchmarks():
    assert {"experiments.recipes.resnet_frozen", "experiments.common", "benchmarks.bench"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_the_module_imports(name):
    importlib.import_module(name)


def _project_imports(name: str) -> list[tuple[str, list[str]]]:
    """(module, names) of every import of a project module in `name`'s file, at any depth."""
    path = ROOT / Path(*name.split(".")).with_suffix(".py")
    if not path.is_file():
        path = path.with_suffix("") / "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
    return [(m, names) for m, names in found if m.split(".")[0] in ("tl", "experiments", "benchmarks")]


@pytest.mark.parametrize("name", MODULES)
def test_every_import_inside_a_function_resolves_too(name):
    for module, names in _project_imports(name):
        imported = importlib.import_module(module)
        for n in names:
            assert hasattr(imported, n) or importlib.util.find_spec(f"{module}.{n}"), \
                f"{name} imports {n} from {module}, which has no such name"


def test_no_study_or_benchmark_takes_helpers_from_another_study():
    """Only compare_all imports report (to draw and write its own report); nobody imports compare_all."""
    for name in MODULES:
        for module, names in _project_imports(name):
            targets = [module, *(f"{module}.{n}" for n in names)]
            assert "experiments.compare_all" not in targets, f"{name} imports experiments.compare_all"
            if name != "experiments.compare_all":
                assert "experiments.report" not in targets, f"{name} imports experiments.report"
