"""A trial's life in a shared study (tl/engine/trials.py): a random stream per trial, trials whose
process is gone failed and retried once, reasons kept, and Ctrl-C or an error said once."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from tl import Interrupted, TLError  # noqa: E402
from tl.engine import trials, tuning  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SETUP = {"recipe": "r", "dataset": "d", "data_fingerprint": "f"}


def _objective(trial) -> float:
    """A search space of the search's kinds: log-uniform and uniform floats, whole numbers, choices."""
    x = trial.suggest_float("x", 0.1, 10.0, log=True) + trial.suggest_float("y", 0.0, 0.2)
    return x + trial.suggest_int("n", 1, 6) + len(trial.suggest_categorical("c", ["a", "bb", "ccc"]))


def _params(study) -> list[dict]:
    return [t.params for t in study.trials]


def _open(path, seed=0):
    return tuning.open_study(path, "s", SETUP, seed)


# ----------------------------------------------------------------------------- a random stream per trial
def test_one_search_from_an_empty_study_is_repeatable():
    """The same --seed gives the same numbers in the same order, past TPE's random start
    (12 trials); another seed gives others."""
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):  # in memory: the sampler is what is tested
        study = optuna.create_study(direction="maximize", sampler=trials.TrialSampler(seed))
        study.optimize(lambda t: trials.run_trial(t, _objective), n_trials=12)
        runs[name] = _params(study)
    assert runs["a"] == runs["b"]
    assert not any(p in runs["c"] for p in runs["a"])


def test_workers_and_a_search_run_again_never_draw_the_same_numbers(tmp_path):
    """Two processes on one study with the same seed (two Study objects, as two processes open
    it), asking in turn, and a third opening after them: all numbers differ."""
    first, second = _open(tmp_path / "s.db"), _open(tmp_path / "s.db")
    for _ in range(4):
        a, b = first.ask(), second.ask()
        first.tell(a, _objective(a))
        second.tell(b, _objective(b))
    again = _open(tmp_path / "s.db")
    again.optimize(_objective, n_trials=3)
    seen = [tuple(sorted(p.items())) for p in _params(again)]
    assert len(seen) == 11 and len(set(seen)) == 11


def test_the_stream_is_the_seed_and_the_trial_number():
    assert trials.trial_seed(0, 3) == trials.trial_seed(0, 3)
    assert len({trials.trial_seed(s, n) for s in range(4) for n in range(50)}) == 200


# ----------------------------------------------------------------------------- who runs a trial
def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _running(study, process: dict | None, **enqueued):
    """A RUNNING trial that drew its numbers and records `process` (None: asked for by a program
    without the search's sampler, it records nothing)."""
    if enqueued:
        study.enqueue_trial({"x": 1.0, "y": 0.1, "n": 2, "c": "a"}, user_attrs=enqueued)
    trial = (study if process is not None else optuna.load_study(study_name="s", storage=study._storage)).ask()
    _objective(trial)
    if process is not None:
        trial.set_user_attr("process", process)
    return trial.number


def test_this_process_and_a_gone_one_are_told_apart():
    me = trials.this_process()
    assert me["host"] == socket.gethostname() and me["pid"] == os.getpid() and not trials.gone(me)
    assert trials.gone({**me, "pid": _dead_pid()})
    if me["started"] is not None:  # /proc: a reused process id is another process
        assert trials.gone({**me, "started": me["started"] - 1})
        zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # ended, not yet waited for
        while trials._started(zombie.pid)[0] != "Z":
            time.sleep(0.05)
        assert trials.gone({**me, "pid": zombie.pid, "started": trials._started(zombie.pid)[1]})
        zombie.wait()


def test_trials_whose_process_is_gone_are_failed_when_the_study_opens_and_retried_once(tmp_path):
    me = trials.this_process()
    here_dead = {**me, "pid": _dead_pid()}
    study = _open(tmp_path / "s.db")
    study.optimize(_objective, n_trials=1)
    killed = _running(study, here_dead)
    reused = _running(study, {**me, "started": (me["started"] or 0) - 1} if me["started"] else here_dead)
    alive = _running(study, me)
    elsewhere = _running(study, {"host": "another-machine", "pid": here_dead["pid"], "started": 1})
    unsaid = _running(study, None)
    a_retry = _running(study, here_dead, retry_of=0)
    empty = study.ask()  # drew nothing before its process died
    empty.set_user_attr("process", here_dead)

    study = _open(tmp_path / "s.db")
    states = {t.number: t.state.name for t in study.trials}
    assert [states[n] for n in (killed, reused, unsaid, a_retry, empty.number)] == ["FAIL"] * 5
    assert [states[n] for n in (alive, elsewhere)] == ["RUNNING"] * 2  # the heartbeat's to judge
    why = trials.failures(study)
    assert set(why) == {killed, reused, unsaid, a_retry, empty.number}
    assert why[killed] == (f"its process (host {me['host']}, pid {here_dead['pid']}) was gone when the search "
                           f"was opened again")
    assert why[unsaid].startswith("it recorded no process: its process ended as the trial was created")
    assert trials.retries(study) == {a_retry: 0, empty.number + 1: killed, empty.number + 2: reused,
                                     empty.number + 3: unsaid}
    by_number = {t.number: t for t in study.trials}
    assert [by_number[empty.number + n].state.name for n in (1, 2, 3)] == ["WAITING"] * 3

    study = _open(tmp_path / "s.db")  # opened again: nothing more to do
    assert len(study.trials) == empty.number + 4 and len(trials.retries(study)) == 4
    study.optimize(_objective, n_trials=1)  # a worker takes the first retry, with the killed trial's numbers
    retry = study.trials[empty.number + 1]
    assert retry.params == by_number[killed].params and retry.user_attrs["retry_of"] == killed


def test_a_trial_whose_process_ended_inside_ask_is_failed_at_once(tmp_path):
    """Processes that end right after Optuna's ask() (a new trial, a queued retry taken from the
    queue, and a trial asked for without the search's sampler): each is failed and named when
    the search opens the study, not waited for until the heartbeat's grace."""
    study = _open(tmp_path / "s.db")
    first = _running(study, {**trials.this_process(), "pid": _dead_pid()})
    study = _open(tmp_path / "s.db")  # the first trial failed, its retry queued
    code = (f"import os, sys; sys.path.insert(0, {str(ROOT)!r}); import optuna; from tl.engine import trials; "
            f"url = 'sqlite:///{tmp_path / 's.db'}'; "
            f"s = optuna.load_study(study_name='s', storage=url, sampler=trials.TrialSampler(0)); s.ask(); s.ask(); "
            f"optuna.load_study(study_name='s', storage=url).ask(); os._exit(0)")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    asked = [t.number for t in study.trials if t.state.name == "RUNNING"]
    assert asked == [first + 1, first + 2, first + 3], [(t.number, t.state.name) for t in study.trials]
    study = _open(tmp_path / "s.db")
    assert [t.state.name for t in study.trials] == ["FAIL"] * 4
    why = trials.failures(study)
    assert all("was gone when the search was opened again" in why[n] for n in asked[:2]), why
    assert why[asked[2]].startswith("it recorded no process"), why
    assert trials.retries(study) == {first + 1: first}  # none drew numbers: nothing more to retry
    assert tuning.lost_trials(study).still_running(study) == []


def test_a_retry_whose_process_is_gone_is_not_retried_again(tmp_path):
    study = _open(tmp_path / "s.db")
    first = _running(study, {**trials.this_process(), "pid": _dead_pid()})
    study = _open(tmp_path / "s.db")
    assert trials.retries(study) == {first + 1: first}
    trial = study.ask()  # the retry, with the first trial's numbers
    _objective(trial)
    assert trial.number == first + 1 and trial.params == study.trials[first].params
    trial.set_user_attr("process", {**trials.this_process(), "pid": _dead_pid()})
    study = _open(tmp_path / "s.db")
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"] and trials.retries(study) == {first + 1: first}


def test_a_silent_trial_of_another_machine_is_failed_after_the_grace_and_retried_once(tmp_path, monkeypatch):
    """Optuna's heartbeat check fails it and hands it to LostTrials, which says why and queues
    its numbers once."""
    monkeypatch.setattr(tuning, "HEARTBEAT_S", 1)
    monkeypatch.setattr(tuning, "GRACE_S", 1)
    study = _open(tmp_path / "s.db")
    number = _running(study, {"host": "another-machine", "pid": 1234, "started": 5})
    study._storage.record_heartbeat(study.trials[number]._trial_id)
    time.sleep(2.2)
    study = _open(tmp_path / "s.db")
    assert study.trials[number].state.name == "FAIL"
    assert trials.failures(study)[number].startswith("its heartbeat stopped for more than 1 s (host another-machine, "
                                                     "pid 1234)")
    assert trials.retries(study) == {number + 1: number}
    trials.LostTrials(grace_s=1)(study, study.trials[number])  # handed over again: no second retry
    assert trials.retries(study) == {number + 1: number}


def test_the_trials_still_running_are_those_that_said_who_runs_them_or_are_young(tmp_path):
    """A trial killed before it recorded its process would otherwise be waited for forever."""
    study = _open(tmp_path / "s.db")
    stamped = _running(study, {"host": "another-machine", "pid": 1, "started": 1})
    unsaid = _running(study, None)
    assert trials.LostTrials(grace_s=3600).still_running(study) == [stamped, unsaid]
    assert trials.LostTrials(grace_s=0).still_running(study) == [stamped]


# ----------------------------------------------------------------------------- a stop said once
@pytest.mark.parametrize("error, says", [
    (KeyboardInterrupt(), "interrupted (Ctrl-C)"),
    (Interrupted("interrupted: runs/x/last.ckpt holds the last completed epoch"), "interrupted (Ctrl-C)"),
    (TLError("the data folder went away\nsecond line"), "TLError: the data folder went away"),
    (RuntimeError("a bug"), "RuntimeError: a bug"),
])
def test_a_trial_stopped_by_ctrl_c_or_an_error_is_failed_labelled_and_not_logged_by_optuna(tmp_path, error, says):
    study = _open(tmp_path / "s.db")
    study.optimize(_objective, n_trials=1)

    def stopped(trial):
        _objective(trial)
        raise error

    def not_ours(trial):
        raise ValueError("not run through run_trial")

    logged = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append((record.getMessage(), record.exc_info))
    logging.getLogger("optuna").addHandler(handler)  # where Optuna's own handler sits
    try:
        with pytest.raises(type(error)):
            study.optimize(lambda t: trials.run_trial(t, stopped), n_trials=1)
        with pytest.raises(ValueError):  # a failure that no one else reports is Optuna's to log, as before
            study.optimize(not_ours, n_trials=1)
    finally:
        logging.getLogger("optuna").removeHandler(handler)
    assert not [m for m, _ in logged if m.startswith("Trial 1 ")], logged
    assert [exc[0] for m, exc in logged if m.startswith("Trial 2 failed") and exc] == [ValueError]
    assert study.trials[1].state.name == "FAIL" and trials.failures(study)[1].startswith(says)
    assert trials.retries(study) == {} and study.trials[1].user_attrs["process"]["pid"] == os.getpid()


# ----------------------------------------------------------------------------- an interrupt is never lost
class _Garbage:
    """Sends `signum` to this process when freed, from a place where Python swallows the
    KeyboardInterrupt its handler raises: `__del__`, or a weak reference's callback."""

    def __init__(self, signum, cycle: bool, weak: list | None = None):
        self.signum, self.me = signum, self if cycle else None
        if weak is not None:
            weak.append(weakref.ref(self, lambda ref: _Garbage._send(signum)))

    @staticmethod
    def _send(signum) -> None:
        os.kill(os.getpid(), signum)
        time.sleep(0.05)  # the handler runs here

    def __del__(self):
        if not hasattr(self, "weak"):
            self._send(self.signum)


def _interrupted_search(objective, stopped_by: list):
    from tl.engine.command import interrupts_noted, stop_if_interrupted

    study = optuna.create_study(direction="maximize", sampler=trials.TrialSampler(0))  # in memory: quick
    with pytest.raises(KeyboardInterrupt), interrupts_noted(stopped_by):
        study.optimize(lambda t: trials.run_trial(t, objective), n_trials=3, gc_after_trial=True,
                       callbacks=[stop_if_interrupted])
    return study


@pytest.mark.parametrize("signum, where", [  # SIGINT (2, Ctrl-C), SIGTERM (15, tl.engine.command's interrupt)
    (2, "__del__ in the collection after the trial"), (2, "weakref callback in it"),
    (2, "__del__ in the middle of the trial"), (15, "__del__ in the collection after the trial")])
def test_an_interrupt_swallowed_where_python_ignores_exceptions_still_stops_the_search(monkeypatch, where, signum):
    """The search stops after the trial, and Python's "Exception ignored" report of the swallowed
    KeyboardInterrupt (sys.unraisablehook) is left out."""
    weak, stopped_by, reported = [], [2], []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)

    def objective(trial):
        value = _objective(trial)
        if trial.number > 0:
            pass
        elif "middle" in where:
            _Garbage(signum, cycle=False)  # freed at once, inside the trial: the trial goes on to its end
        elif "weakref" in where:
            garbage = _Garbage(signum, cycle=True, weak=weak)
            garbage.weak = True  # only the weak reference's callback sends the signal
        else:
            _Garbage(signum, cycle=True)  # freed by Optuna's gc.collect() after the trial
        return value

    study = _interrupted_search(objective, stopped_by)
    assert [t.state.name for t in study.trials] == ["COMPLETE"]  # stopped after the first trial, not the third
    assert stopped_by == [2, signum]
    assert reported == []


@pytest.mark.parametrize("signum, says", [(2, "interrupted (Ctrl-C)"),
                                          (15, "interrupted (SIGTERM): stopped by a kill")])
def test_quick_repeated_interrupts_let_the_first_one_tidy_up_and_the_trial_says_which(tmp_path, signum, says):
    tidied = []

    def objective(trial):
        _objective(trial)
        try:
            os.kill(os.getpid(), signum)
            time.sleep(5)
        except KeyboardInterrupt:
            os.kill(os.getpid(), signum)  # pressed again at once, while the first is tidied up
            os.kill(os.getpid(), signum)
            time.sleep(0.05)
            tidied.append(trial.number)
            raise

    study = _interrupted_search(objective, [2])
    assert tidied == [0] and [t.state.name for t in study.trials] == ["FAIL"]
    assert trials.failures(study)[0].startswith(says)
