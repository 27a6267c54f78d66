"""The shape of the code, measured: a core a learner reads in one sitting, imports that run one
way (main.py / commands.py -> experiments/ -> tl/engine/ -> tl/ core -> torch), and tests filed
by the module they test (tests/README.md).

These tests read the source with `ast`; the last one traces a tiny frozen run and counts
the lines of core functions it enters, so a new feature cannot quietly put itself on the
learner's path."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import main

ROOT = Path(__file__).resolve().parents[1]
CORE = sorted((ROOT / "tl").glob("*.py"))
CORE_LINES, FUNCTION_LINES, FUNCTION_PARAMS, TRACED_CORE_LINES = 1200, 60, 8, 500
LINE_CHARS = 100  # a core line reads without scrolling, side by side with the documents


def _modules() -> dict[str, Path]:
    """Every module of the project (not the tests), by dotted name."""
    files = [ROOT / "main.py", ROOT / "commands.py", *ROOT.glob("tl/**/*.py"), *ROOT.glob("experiments/**/*.py")]
    names = {}
    for f in files:
        if f.is_file():
            parts = f.relative_to(ROOT).with_suffix("").parts
            names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return names


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) for every import in `path`, at any depth (function-level imports count)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [a.name for a in node.names]))
    return found


def _targets(module: str, names: list[str], known: dict[str, Path]) -> set[str]:
    """The project modules an import statement reaches (`from tl.engine import run` reaches tl.engine.run)."""
    hit = {module} if module in known else set()
    hit |= {f"{module}.{n}" for n in names if f"{module}.{n}" in known}
    return hit


def _layer(module: str) -> int:
    if module in ("main", "commands"):
        return 3
    if module.startswith("experiments"):
        return 2
    if module.startswith("tl.engine"):
        return 1
    return 0  # the core: tl and tl.<module>


def test_the_core_is_short_and_its_functions_small():
    assert sum(len(f.read_text().splitlines()) for f in CORE) <= CORE_LINES
    for f in CORE:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                params = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
                params = [a for a in params if a is not None and a.arg not in ("self", "cls")]
                where = f"{f.name}:{node.name}"
                assert node.end_lineno - node.lineno + 1 <= FUNCTION_LINES, f"{where} is longer than 60 lines"
                assert len(params) <= FUNCTION_PARAMS, f"{where} takes more than 8 parameters"


def test_no_core_line_is_longer_than_100_characters():
    """Every line of tl/*.py fits in LINE_CHARS characters: a dense line is rewritten into fewer
    ideas (shorter local names, a message built in a named variable), not left to scroll."""
    long = [f"{f.name}:{i}: {len(line)} characters" for f in CORE
            for i, line in enumerate(f.read_text().splitlines(), 1) if len(line) > LINE_CHARS]
    assert not long, f"core lines longer than {LINE_CHARS} characters: {long}"


def test_the_loop_shows_the_plain_update():
    source = (ROOT / "tl" / "loop.py").read_text()
    assert "loss.backward()" in source and "optimizer.step()" in source
    assert "set_grad_enabled(phase == \"train\")" in source


def test_imports_run_one_way_without_cycles():
    known = _modules()
    graph = {m: set() for m in known}
    for module, path in known.items():
        for target, names in _imports(path):
            for hit in _targets(target, names, known) - {module}:
                if hit in ("tl", "tl.engine") and names:  # a package: its names, unless they are modules
                    continue
                graph[module].add(hit)
                assert _layer(hit) <= _layer(module), f"{module} imports {hit}, against the one-way order"
    done, stack = set(), []

    def visit(m):
        assert m not in stack, f"import cycle: {' -> '.join(stack[stack.index(m):] + [m])}"
        if m in done:
            return
        stack.append(m)
        for n in graph[m]:
            visit(n)
        stack.pop()
        done.add(m)

    for m in graph:
        visit(m)


def test_no_private_name_is_imported_from_another_module():
    known = _modules()
    for module, path in known.items():
        for target, names in _imports(path):
            if target in known or target.startswith(("tl", "experiments")):
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                assert not private, f"{module} imports private {private} from {target}"


def test_a_frozen_run_enters_few_lines_of_the_core(tiny_data, pretrained, tmp_path, own_cache_dir):
    """The traced run: `resnet_frozen --quick` on tiny images (on hymenoptera with efficientnet_lite0
    the run enters the same core functions)."""
    lengths = {}
    for f in CORE:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths[(str(f), node.lineno)] = node.end_lineno - node.lineno + 1
    entered = set()

    def profile(frame, event, arg):
        if event == "call":
            code = frame.f_code
            first = code.co_firstlineno
            key = (code.co_filename, first)
            if key in lengths:
                entered.add(key)
            else:  # a decorated function's code starts at its decorator
                for k in ((code.co_filename, first + 1), (code.co_filename, first + 2)):
                    if k in lengths:
                        entered.add(k)

    sys.setprofile(profile)
    try:
        code = main.main(["-e", "resnet_frozen", "-b", "tiny", "--weights", str(pretrained), "--data", str(tiny_data),
                          "--quick", "--out", str(tmp_path / "runs"), "--no-progress"])
    finally:
        sys.setprofile(None)
    assert code == 0
    total = sum(lengths[k] for k in entered)
    print(f"core lines entered: {total}", *sorted(f"{Path(f).name}:{line}" for f, line in entered))
    assert 0 < total <= TRACED_CORE_LINES, f"the run entered {total} lines of core functions"


NOT_A_SUBJECT = re.compile(r"review|round|issue|planted|_\d+\.py$")  # when a test was found, not what it tests


def _test_names(path: Path) -> list[str]:
    return [n.name for n in ast.parse(path.read_text()).body
            if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]


def test_every_module_has_its_test_file_and_test_files_are_named_for_what_they_test():
    """tl/M.py's tests are in tests/test_M.py, tl/engine/M.py's in tests/engine/test_M.py (tests/README.md),
    each file holding at least one test; no test file is named after a review, a round or an issue."""
    tests = ROOT / "tests"
    wanted = [tests / f"test_{p.stem}.py" for p in CORE if p.stem != "__init__"]
    wanted += [tests / "engine" / f"test_{p.stem}.py" for p in sorted((ROOT / "tl" / "engine").glob("*.py"))
               if p.stem != "__init__"]
    missing = [str(p.relative_to(ROOT)) for p in wanted if not p.is_file() or not _test_names(p)]
    assert not missing, f"modules without a test file of their name (or with no test in it): {missing}"
    misnamed = sorted(str(p.relative_to(ROOT)) for p in tests.rglob("test_*.py") if NOT_A_SUBJECT.search(p.name))
    assert not misnamed, f"test files named after when they were written, not what they test: {misnamed}"
