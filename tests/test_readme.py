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
