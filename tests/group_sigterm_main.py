"""`python main.py ARGS` (or `python -m experiments.tune ARGS`: `tune ARGS`) with every image
opened slowly, for the tests that stop a command's whole process group with SIGTERM
(tests/engine/test_command.py): `python tests/group_sigterm_main.py [tune] ARGS`.

It registers the tiny backbone of tests/conftest.py (a subprocess does not see pytest's
fixtures), and a DataLoader worker process prints "a worker opens an image" and waits 0.2 s
before each image it opens: the test sends its signal while the workers are at work.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import main  # noqa: E402
from experiments import tune  # noqa: E402
from tests.conftest import TINY  # noqa: E402
from tl.engine import images  # noqa: E402
from tl.engine.command import command  # noqa: E402
from tl.models import BACKBONES  # noqa: E402

BACKBONES["tiny"] = TINY
MAIN_PROCESS = os.getpid()
_open = images._open


def slow_open(path):
    if os.getpid() != MAIN_PROCESS:
        print("a worker opens an image", flush=True)
        time.sleep(0.2)
    return _open(path)


images._open = slow_open
if sys.argv[1:2] == ["tune"]:
    sys.exit(command(lambda: tune.main(sys.argv[2:])))
sys.exit(main.main(sys.argv[1:]))
