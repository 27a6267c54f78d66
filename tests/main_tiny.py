"""`python main.py` for the tests that run a training command as its own process
(tests/engine/test_run_folder.py): `python tests/main_tiny.py ARGS`.

A subprocess does not see pytest's fixtures, so this script registers the tiny backbone of
tests/conftest.py, then runs main.py's `main`. Test hook, set by an environment variable:

TL_TEST_HOLD_EPOCH=N     the run waits once epoch N is saved, after printing "holding after
                         epoch N": a run that holds its folder, to be asked for or killed,
                         without using the CPU meanwhile.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import main  # noqa: E402
from tests.conftest import TINY  # noqa: E402
from tl.engine.run_folder import RunFolder  # noqa: E402
from tl.models import BACKBONES  # noqa: E402

BACKBONES["tiny"] = TINY

if "TL_TEST_HOLD_EPOCH" in os.environ:
    end_of_epoch = RunFolder.end_of_epoch

    def holding(self, epoch, history):
        stop = end_of_epoch(self, epoch, history)
        if epoch == int(os.environ["TL_TEST_HOLD_EPOCH"]):
            print(f"holding after epoch {epoch}", flush=True)
            time.sleep(600)
        return stop

    RunFolder.end_of_epoch = holding

if __name__ == "__main__":
    sys.exit(main.main())
