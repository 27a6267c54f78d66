"""`python -m experiments.tune` for the tests that run a search as its own process
(tests/experiments/test_tune.py): `python tests/tune_main.py ARGS`.

A subprocess does not see pytest's fixtures, so this script registers the tiny backbone of
tests/conftest.py, then runs the search exactly as `python -m experiments.tune` does. Test
hooks, set by environment variables:

TL_TEST_HOLD_TRIAL=N     trial N waits at the end of its first epoch, after printing
                         "holding trial N": a process to kill or interrupt mid-trial.
TL_TEST_SWALLOWED="SIGNAL WHERE"
                         the process sends itself SIGINT or SIGTERM from code that Python runs
                         where it swallows the exception a signal handler raises: WHERE is
                         "del" (an object's __del__, collected by the garbage collection Optuna
                         runs after trial 0), "weakref" (a weak reference's callback in that
                         collection, as SQLAlchemy's are) or "epoch" (an object dropped in the
                         middle of trial 0, after its first epoch).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import tune  # noqa: E402
from tests.conftest import TINY  # noqa: E402
from tl.engine.command import command  # noqa: E402
from tl.models import BACKBONES  # noqa: E402

BACKBONES["tiny"] = TINY

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

if "TL_TEST_SWALLOWED" in os.environ:
    import signal
    import weakref

    SIGNAL, WHERE = os.environ["TL_TEST_SWALLOWED"].split()
    KEPT = []

    def send(*_) -> None:
        os.kill(os.getpid(), getattr(signal, SIGNAL))
        time.sleep(0.2)  # the handler runs here, inside the collector's callback

    class Garbage:
        def __init__(self, on_del: bool):
            self.me, self.on_del = self, on_del  # a cycle: freed by the garbage collector, not at once

        def __del__(self):
            if self.on_del:
                send()

    score_trial, reporter = tune.score_trial, tune.pruning_reporter

    def score_then_garbage(trial, s, log=print):
        score = score_trial(trial, s, log)
        if trial.number == 0 and WHERE in ("del", "weakref"):
            garbage = Garbage(on_del=WHERE == "del")
            KEPT.append(weakref.ref(garbage, send) if WHERE == "weakref" else None)
        return score

    def garbage_mid_trial(trial, fold, log):
        on_epoch = reporter(trial, fold, log)

        def hook(epoch, history):
            on_epoch(epoch, history)
            if trial.number == 0 and epoch == 0 and WHERE == "epoch":
                garbage = Garbage(on_del=True)
                garbage.me = None  # no cycle: freed at once, here
                del garbage
        return hook

    tune.score_trial, tune.pruning_reporter = score_then_garbage, garbage_mid_trial

if __name__ == "__main__":
    sys.exit(command(tune.main))
