"""tl/engine/folders.py: a failed command leaves none of the folders it made empty; files, the
folders that hold them and folders that were there before are kept; every folder the project
makes is made by `folders.make` (a code check that can fail, tried on planted calls)."""

from __future__ import annotations

import ast
import errno
from pathlib import Path

import pytest

from tl import TLError
from tl.engine import files, folders
from tl.engine.command import command

ROOT = Path(__file__).resolve().parents[2]


def test_make_notes_only_the_folders_it_creates(tmp_path):
    (tmp_path / "there").mkdir()
    since = len(folders._made)
    folders.make(tmp_path / "there" / "a" / "b")
    folders.make(tmp_path / "there" / "a" / "b")  # exists now: nothing more to note
    assert folders._made[since:] == [tmp_path / "there" / "a", tmp_path / "there" / "a" / "b"]
    folders.remove_empty_made(since)
    assert (tmp_path / "there").is_dir() and not (tmp_path / "there" / "a").exists()


def test_make_with_exist_ok_false_refuses_an_existing_last_folder(tmp_path):
    folders.make(tmp_path / "run", exist_ok=False)
    with pytest.raises(FileExistsError):
        folders.make(tmp_path / "run", exist_ok=False)


FAILURES = {  # what stops a command, and its exit status
    "full disk": (OSError(errno.ENOSPC, "No space left on device", "x"), 2),
    "bad input": (TLError("no such recipe"), 2),
    "permission": (PermissionError(errno.EACCES, "Permission denied", "x"), 2),
    "Ctrl-C": (KeyboardInterrupt(), 130),
}


@pytest.mark.parametrize("failure, status", FAILURES.values(), ids=FAILURES.keys())
def test_a_failed_command_leaves_no_empty_folder_it_made(tmp_path, capsys, failure, status):
    (tmp_path / "old" / "empty").mkdir(parents=True)  # the user's, empty before the command: kept

    def body():
        folders.make(tmp_path / "out" / "deep" / "er")
        folders.make(tmp_path / "old" / "new")
        files.atomic_write_text(tmp_path / "written" / "sub" / "page.md", "a whole page\n")
        folders.make(tmp_path / "written" / "sub" / "empty")
        raise failure

    assert command(body) == status
    assert capsys.readouterr().err.startswith("error: ")
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert left == ["old", "old/empty", "written", "written/sub", "written/sub/page.md"]


def test_a_command_that_succeeds_keeps_its_empty_folders(tmp_path):
    assert command(lambda: folders.make(tmp_path / "out" / "empty") and None) == 0
    assert (tmp_path / "out" / "empty").is_dir()


def test_a_command_inside_another_answers_for_its_own_folders(tmp_path, capsys):
    def inner():
        folders.make(tmp_path / "inner")
        raise TLError("inner fails")

    def outer():
        folders.make(tmp_path / "outer")
        assert command(inner) == 2
        assert (tmp_path / "outer").is_dir() and not (tmp_path / "inner").exists()

    assert command(outer) == 0 and (tmp_path / "outer").is_dir()


# ----------------------------------------------------------------------------- the code itself
MAKERS = ("mkdir", "os.makedirs", "makedirs", "os.mkdir")


def _folder_makers(path: Path) -> list[tuple[int, str]]:
    text = path.read_text()
    return [(node.lineno, text.splitlines()[node.lineno - 1].strip()) for node in ast.walk(ast.parse(text))
            if isinstance(node, ast.Call) and any(ast.unparse(node.func) == m or ast.unparse(node.func).endswith(
                "." + m) for m in MAKERS)]


def test_every_folder_is_made_by_folders_make():
    """No module makes a folder itself: one it made and left empty would outlive a failed command."""
    bad = []
    for path in [ROOT / "main.py", ROOT / "commands.py", *ROOT.glob("tl/**/*.py"), *ROOT.glob("experiments/**/*.py"),
                 *ROOT.glob("benchmarks/*.py")]:
        name = path.relative_to(ROOT).as_posix()
        if name != "tl/engine/folders.py":
            bad += [f"{name}:{n}: {line}" for n, line in _folder_makers(path)]
    assert not bad, "folders made outside tl/engine/folders.py:\n" + "\n".join(bad)


def test_the_code_check_sees_each_way_to_make_a_folder(tmp_path):
    code = tmp_path / "makers.py"
    code.write_text("\n".join(["p.mkdir()", "(out / 'x').mkdir(parents=True)", "os.makedirs(p)", "os.mkdir(p)",
                               "folders.make(p)", "p.exists()"]))  # the last two make nothing themselves
    assert [n for n, _ in _folder_makers(code)] == [1, 2, 3, 4]


def test_a_command_that_returns_an_error_status_leaves_no_empty_folder_it_made(tmp_path, capsys):
    """A study that says its own error and returns 2 (or 130) is a failed command too."""
    def body():
        folders.make(tmp_path / "runs" / "data" / "run-seed0")
        return 2

    assert command(body) == 2 and not (tmp_path / "runs").exists()
