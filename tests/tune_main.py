"""`python -m experiments.tune` for the tests that run a search as its own process
(tests/experiments/test_tune.py): `python tests/tune_main.py ARGS`.

A subprocess does not see pytest's fixtures, so this script registers the tiny backbone of
tests/conftest.py, then runs the search exactly as `python -m experiments.tune` does. One
test hook, set by an environment variable:

TL_TEST_HOLD_TRIAL=N     trial N waits at the end of its first epoch, after printing
                         "holding trial N": a process to kill or interrupt mid-trial.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import tune  # noqa: E402
from tests.conftest import TinyNet  # noqa: E402
from tl.engine.command import command  # noqa: E402
from tl.models import BACKBONES, Backbone  # noqa: E402

BACKBONES["tiny"] = Backbone("tiny", TinyNet, head="fc", neck=("block",))

if "TL_TEST_HOLD_TRIAL" in os.environ:
    pruning_reporter = tune.pruning_reporter

    def holding_reporter(trial, fold, log):
        on_epoch = pruning_reporter(trial, fold, log)

        def hold(epoch, history):
            on_epoch(epoch, history)
            if trial.number == int(os.environ["TL_TEST_HOLD_TRIAL"]):
                print(f"holding trial {trial.number}", flush=True)
                time.sleep(600)
        return hold

    tune.pruning_reporter = holding_reporter

if __name__ == "__main__":
    sys.exit(command(tune.main))
