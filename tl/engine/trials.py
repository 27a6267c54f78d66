"""A trial's life in a study that several processes, or machines, share (experiments/tune.py).

A search is long, so it is killed, interrupted and spread over workers. Three rules keep
its trials honest; the search's study goes through this module for each:

* Every trial has a random stream of its own. `TrialSampler` is Optuna's TPE, created
  afresh for each trial with the seed `trial_seed(--seed, trial number)`. The study hands
  out trial numbers, one per trial across all its processes and machines, so two workers,
  or a search run again after a kill, never draw from the same stream (a sampler seeded
  once per process would start every rerun, and every worker, from the same state and
  propose the same numbers again). One uninterrupted search from an empty study with a
  given --seed proposes the same numbers in the same order every time: trial n's stream
  depends on the seed and n alone, and TPE's model on the trials before it.

* Every trial records who runs it (user_attr "process": host, process id, and when the
  process started, so that a reused process id is not taken for it), inside Optuna's
  `ask()` as the trial is created (`TrialSampler.before_trial`). A trial whose process
  is gone stays RUNNING in the study: `LostTrials.sweep`, run when a search opens the
  study (and when a worker ends), marks failed at once every RUNNING trial of this host
  whose process is gone, and every RUNNING trial that still records no process a moment
  after it was seen (its process ended inside `ask()`, or it was asked for by a program
  without this sampler: nothing runs it). A trial of another machine is left to the heartbeat: silent for
  the grace period, Optuna marks it failed and calls `LostTrials` (the storage's
  heartbeat_stale_trial_callback). A lost trial's numbers are queued to be tried again
  once, as a trial labelled user_attr "retry_of" = its number; a retry is never retried.
  Apart from retries no trial is handed another's numbers: each draws from its own stream.

* Why a trial failed is said, not lost: `failure` reads it back (the pages and the tuned
  file list it). Optuna cannot change a finished trial's attributes, so the reasons live in
  the study's user_attrs, one per failed trial ("trial N failed because"). A trial stopped
  by Ctrl-C (not retried: a person stopped it), or by an error (`run_trial`), is failed
  and labelled, and Optuna's own log of it (a traceback) is left out: the command says it
  once, in its `error:` line (or, for a bug, in the traceback it lets through).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
import signal
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.trial import TrialState

from tl import Interrupted
from tl.engine.command import noted_signal, stop_if_interrupted

SETTLE_S = 1.0  # how long a trial may be seen without its process record before it counts as lost


def trial_seed(seed: int, number: int) -> int:
    """The seed of trial `number`'s random stream in a search run with --seed `seed`."""
    return int.from_bytes(hashlib.sha256(f"{seed} {number}".encode()).digest()[:4], "big")


class TrialSampler(optuna.samplers.BaseSampler):
    """TPE with a random stream per trial (see the module docstring): each trial's proposals
    come from `TPESampler(seed=trial_seed(seed, trial.number), **tpe)`, which reads the
    study's trials as every TPE does."""

    def __init__(self, seed: int, **tpe):
        self.seed, self.tpe, self._current = seed, tpe, None

    def _for(self, trial) -> optuna.samplers.TPESampler:
        if self._current is None or self._current[0] != trial.number:
            with warnings.catch_warnings():  # some TPE arguments are marked experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                tpe = optuna.samplers.TPESampler(seed=trial_seed(self.seed, trial.number), **self.tpe)
            self._current = (trial.number, tpe)
        return self._current[1]

    def infer_relative_search_space(self, study, trial):
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        """Optuna calls this inside `ask()`, as the trial is created (or taken from the queue):
        the trial records who runs it there, so a process that dies at any later moment has
        left its record (run_trial's objective may never start)."""
        study._storage.set_trial_user_attr(trial._trial_id, "process", this_process())
        self._for(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self._for(trial).after_trial(study, trial, state, values)


# ----------------------------------------------------------------------------- who runs a trial
def _started(pid: int | str) -> tuple[str, int] | None:
    """Process `pid`'s state letter and start time (clock ticks after boot: /proc/PID/stat,
    fields 3 and 22), or None where it has no such file."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[19])


def this_process() -> dict:
    """What a trial records about the process that runs it (user_attr "process")."""
    own = _started("self")
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": own[1] if own else None}


def gone(process: dict) -> bool:
    """Whether the process `this_process()` described (on this host) has ended: no such
    process, a zombie, or another process that reuses its id (it started at another time).
    Where /proc is missing (macOS) the process id alone is asked; on Windows nothing is
    known, and the heartbeat decides."""
    if Path("/proc/self/stat").exists():
        now = _started(process["pid"])
        return now is None or now[0] in "ZX" or (process.get("started") is not None and now[1] != process["started"])
    if os.name != "posix":
        return False
    try:
        os.kill(process["pid"], 0)  # signal 0: asks whether the process exists, sends nothing
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, run by another user
        return False
    return False


# ----------------------------------------------------------------------------- why a trial failed
def _key(number: int) -> str:
    return f"trial {number} failed because"


def failure(study_attrs: dict, trial) -> str | None:
    """Why `trial` failed, as recorded (None for a trial that did not fail, or failed
    without a word: Optuna's own failure of a value it could not store)."""
    return study_attrs.get(_key(trial.number)) if trial.state == TrialState.FAIL else None


def failures(study) -> dict[int, str]:
    """{number: why} for every failed trial of `study` (the text says where none was recorded)."""
    attrs = study.user_attrs
    return {t.number: failure(attrs, t) or "no reason was recorded"
            for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}


def retries(study) -> dict[int, int]:
    """{number of a retry: number of the lost trial whose numbers it tries again}."""
    return {t.number: t.user_attrs["retry_of"] for t in study.get_trials(deepcopy=False) if "retry_of" in t.user_attrs}


_SAID: set[int] = set()  # trials whose failure this process reports itself (its one error: line)


class _LeaveOutSaid(logging.Filter):
    """Optuna logs a failed trial with its traceback ("Trial N failed ..."): left out for the
    trials in _SAID, whose error the command prints in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(text.startswith(f"Trial {n} failed") for n in _SAID)


logging.getLogger("optuna.study._optimize").addFilter(_LeaveOutSaid())


# ----------------------------------------------------------------------------- an interrupt is never lost
def _stopped_by() -> str:
    if noted_signal() in (None, signal.SIGINT):
        return "interrupted (Ctrl-C): stopped by the person running the search; not retried"
    return (f"interrupted ({signal.Signals(noted_signal()).name}): stopped by a kill, a timeout or a job scheduler; "
            f"not retried")


def run_trial(trial, score: Callable) -> float:
    """`score(trial)`, the objective every trial of a search runs through, once no interrupt
    is noted: a trial stopped by Ctrl-C, SIGTERM or an error is labelled before the exception
    goes on (Optuna marks the trial failed; the command says the error once)."""
    try:
        stop_if_interrupted()
        return score(trial)
    except optuna.TrialPruned:
        raise
    except (KeyboardInterrupt, Interrupted):
        why = _stopped_by()
        _SAID.add(trial.number)
        trial.study.set_user_attr(_key(trial.number), why)
        raise
    except Exception as exc:  # after a noted interrupt, what failed failed of it (tl/engine/command.py)
        _SAID.add(trial.number)
        why = _stopped_by() if noted_signal() else f"{type(exc).__name__}: {(str(exc) or '-').splitlines()[0]}"
        trial.study.set_user_attr(_key(trial.number), why)
        raise


# ----------------------------------------------------------------------------- lost trials
class LostTrials:
    """Failing the trials whose process is gone, and trying their numbers once more.

    `lock()` guards the check-then-change of a sweep and of a retry against another process
    doing the same at the same moment (a SQLite study: a lock file beside it; a server
    database changes a trial's state under a row lock, so only one process fails a trial).
    Called by Optuna with a trial its heartbeat check has just failed (another machine's, or
    one whose process died while this search ran)."""

    def __init__(self, lock: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 grace_s: int | None = None):
        self.lock, self.grace_s = lock, grace_s

    def __call__(self, study, trial) -> None:
        process = trial.user_attrs.get("process") or {}
        with self.lock():
            study.set_user_attr(_key(trial.number), f"its heartbeat stopped for more than {self.grace_s} s (host "
                                f"{process.get('host', '?')}, pid {process.get('pid', '?')}): its process or its "
                                f"machine stopped")
            self.retry(study, trial)

    def sweep(self, study, when: str = "when the search was opened again") -> list[int]:
        """Fail every RUNNING trial of this host whose process is gone (`when`: when it was
        seen gone), and every one that records no process SETTLE_S after it was first seen
        (a live search records it in the moment it creates the trial); then Optuna's
        heartbeat check for the rest. The numbers failed here."""
        here, failed = socket.gethostname(), []
        unsaid = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                  if "process" not in t.user_attrs}
        if unsaid:
            time.sleep(SETTLE_S)  # a trial being created this moment records its process meanwhile

        def why(t) -> str | None:
            process = t.user_attrs.get("process")
            if process is None:
                return f"it recorded no process: its process ended as the trial was created (seen {when})" \
                    if t.number in unsaid else None
            if process.get("host") == here and gone(process):
                return f"its process (host {here}, pid {process['pid']}) was gone {when}"
            return None

        def lost() -> list:
            return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if why(t)]

        with self.lock() if lost() else contextlib.nullcontext():  # the lock is taken only when there is work
            for t in lost():  # read again under the lock
                study.set_user_attr(_key(t.number), why(t))
                try:
                    study.tell(t.number, state=TrialState.FAIL)
                except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
                    continue  # another process failed it first, and queued its retry
                self.retry(study, t)
                failed.append(t.number)
        with warnings.catch_warnings():  # marked experimental in Optuna 5
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # other machines' silent trials: self(study, trial)
        return failed

    def still_running(self, study) -> list[int]:
        """The RUNNING trials that may still be running somewhere (after `sweep`): those that
        recorded their process, and those too young to have done so. A trial killed in the
        moment between its start and that record, older than the grace period, is not waited
        for (the heartbeat fails it, where it beat once)."""
        young = datetime.datetime.now() - datetime.timedelta(seconds=self.grace_s or 0)
        return [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if "process" in t.user_attrs or (t.datetime_start or young) > young]

    @staticmethod
    def retry(study, trial) -> None:
        """Queue `trial`'s numbers once more, labelled retry_of: not for a retry, not twice,
        not for a trial that drew no numbers."""
        if not trial.params or "retry_of" in trial.user_attrs or trial.number in retries(study).values():
            return
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
