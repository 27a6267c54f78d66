"""Every command the README shows works in a copy of this working tree, as a newcomer would
type it: the ones that need the network stop with one `error:` line (the network is blocked
here), the ones that train run shrunk (`--quick`, tiny copies of the photos), and an explicit
list says which are not run, and why. A broken README command fails CI."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DOGS_VS_CATS, HYMENOPTERA, require_real_data

ROOT = Path(__file__).resolve().parents[1]
NOT_RUN = {  # the start of a command -> why this test does not run it
    "python3 -m venv": "makes the virtual environment these tests already run in",
    "source ": "activates that environment",
    "pip ": "installs packages from the network",
    "python -m pytest": "the test suite itself",
}
# Python run with this directory on its path refuses every internet connection (sitecustomize)
BLOCK = '''import socket
_connect = socket.socket.connect
def _refuse(sock, address, *args, **kwargs):
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        raise OSError("network access is blocked in this test")
    return _connect(sock, address, *args, **kwargs)
socket.socket.connect = _refuse
'''


def readme_commands(text: str) -> list[str]:
    """The commands of the README's ```bash blocks, comments dropped, continuation lines joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            commands += [part.strip() for part in line.split("&&") if part.strip()]
    return commands


def _tiny_copy(src: Path, dest: Path, per_class: int, splits=("train", "val")) -> None:
    for split in splits:
        for folder in sorted(p for p in (src / split).iterdir() if p.is_dir()):
            (dest / split / folder.name).mkdir(parents=True)
            for f in sorted(folder.glob("*.jpg"))[:per_class]:
                shutil.copy(f, dest / split / folder.name / f.name)


@pytest.fixture(scope="module")
def newcomer(tmp_path_factory) -> tuple[Path, dict]:
    """A copy of the working tree (tracked and new files, as they are now), beside a tiny
    `../shared/data`, and an environment with no network and empty caches."""
    require_real_data(HYMENOPTERA), require_real_data(DOGS_VS_CATS)
    top = tmp_path_factory.mktemp("newcomer")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    for name in listed:
        if (ROOT / name).is_file():
            (top / "project" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, top / "project" / name)
    _tiny_copy(HYMENOPTERA, top / "shared" / "data" / "hymenoptera_data", 8)
    flat = top / "shared" / "data" / "dogs-vs-cats-subset" / "train"
    flat.mkdir(parents=True)
    for animal in ("cat", "dog"):
        for i in range(12):
            shutil.copy(DOGS_VS_CATS / "train" / f"{animal}.{i}.jpg", flat)
    (top / "block").mkdir()
    (top / "block" / "sitecustomize.py").write_text(BLOCK)
    env = {**os.environ, "PYTHONPATH": str(top / "block"), "TORCH_HOME": str(top / "torch-home"),
           "TL_CACHE_DIR": str(top / "features"), "TL_DATA_DIR": "", "CI": ""}
    env.pop("TL_DATA_DIR")
    return top / "project", env


def test_every_readme_command_works_in_a_fresh_copy(newcomer):
    project, env = newcomer
    ran, skipped = [], []
    for command in readme_commands((project / "README.md").read_text()):
        if reason := next((why for start, why in NOT_RUN.items() if command.startswith(start)), None):
            skipped.append((command, reason))
            continue
        argv = shlex.split(command)
        assert argv[0] == "python", f"a README command this test does not know how to run: {command}"
        training = "-e" in argv or "--experiment" in argv
        if training:
            argv += ["--quick", "--no-progress"]  # shrunk: 8 images per class, 64 pixels, 1 epoch
        done = subprocess.run([sys.executable, *argv[1:]], cwd=project, env=env, capture_output=True, text=True,
                              timeout=600)
        output = done.stdout + done.stderr
        assert "Traceback" not in output, f"{command}:\n{output[-3000:]}"
        if training and "--data" not in argv:  # online form: the photos would be downloaded
            assert done.returncode == 2 and done.stderr.startswith("error:") and "--data" in done.stderr, \
                f"{command} should stop offline with one message naming --data:\n{output[-2000:]}"
        else:
            assert done.returncode == 0, f"{command} failed:\n{output[-3000:]}"
        ran.append(command)
    assert any("--quick" not in c and "-e" in c for c in ran), "the README's training commands were all skipped"
    assert {reason for _, reason in skipped} <= set(NOT_RUN.values())
    assert not (project / "data" / "hymenoptera_data").exists()  # an offline failure leaves no empty data/


READING_PATH = ["README.md", "docs/READING.md", "docs/GUIDE.md", "docs/reading.py",
                *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tl").glob("*.py"))]
WRITTEN = {  # a path the reading path names that a command writes, not the repository
    "results/peers.md": "python -m benchmarks.peers writes it",
    "results/.results.lock": "the results folder's lock, while a command writes it",
}
HISTORY = ("used to", "no longer", "was changed", "anymore", "formerly")


def _resolves(dotted: str) -> bool:
    import importlib

    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


@pytest.mark.parametrize("doc", READING_PATH)
def test_every_file_and_name_the_reading_path_gives_exists(doc):
    """Each repository path (tl/, experiments/, benchmarks/, tests/, docs/, results/) and each dotted
    `tl.` name that the README, the reading guide and notebook, GUIDE and the core's docstrings and
    comments give is there under that name; placeholders (`<run>`, `tl/M.py`, `NAME`) aside."""
    text = (ROOT / doc).read_text()
    found = re.finditer(r"(?<![\w/.])((?:tl|experiments|benchmarks|tests|docs|results)/[\w./-]*\w)(<?)", text)
    paths = {m[1] for m in found if not m[2]}  # a path that goes on in <...> is a pattern
    missing = [p for p in sorted(paths) if not re.search(r"(^|[/_])M\.py$|NAME", p) and p not in WRITTEN
               and not (ROOT / p).exists() and not (ROOT / "docs" / p).exists()]
    names = set(re.findall(r"(?<![\w/.])(tl(?:\.\w+)+)", text))
    unresolved = [n for n in sorted(names) if not n.endswith(".py") and not _resolves(n)]
    assert missing == [] and unresolved == [], f"{doc} names what is not there: {missing + unresolved}"


@pytest.mark.parametrize("doc", READING_PATH)
def test_the_reading_path_says_what_is_not_how_it_came_to_be(doc):
    """No sentence on the reading path tells history ("used to", "no longer", ...)."""
    text = (ROOT / doc).read_text().lower()
    assert [w for w in HISTORY if re.search(rf"\b{w}\b", text)] == [], doc
