"""tl/engine/tuning.py: the study file (a path taken as it is, a heartbeat that retries a killed
trial) and the search space, which follows the recipe's groups and fields."""

from __future__ import annotations

from pathlib import Path

import pytest

from tl import TLError
from tl.engine import tuning


def test_a_storage_path_with_a_question_mark_is_that_file(tmp_path):
    from tl.engine.tuning import make_storage

    make_storage(tmp_path / "a?b#c.db")
    assert [p.name for p in tmp_path.iterdir()] == ["a?b#c.db"]


@pytest.mark.usefixtures("own_cache_dir")
def test_the_study_file_beats_and_retries_a_killed_trial(tmp_path):
    from tl.engine import tuning
    from tl.engine.trials import LostTrials

    storage = tuning.make_storage(tmp_path / "s.db")
    assert (storage.heartbeat_interval, storage.grace_period) == (tuning.HEARTBEAT_S, tuning.GRACE_S) == (60, 180)
    callback = storage.heartbeat_stale_trial_callback
    assert isinstance(callback, LostTrials) and callback.grace_s == 180  # it retries a killed trial once


@pytest.mark.usefixtures("own_cache_dir")
def test_the_search_space_follows_the_recipe():
    import optuna

    from experiments import get_experiment
    from tl.engine.tuning import suggest
    from tl.recipe import Recipe

    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    plain = Recipe(name="p", source="s", strategy="s", lrs={"all": 1e-3}, loss="bce_logit")
    trial = study.ask()
    changes = suggest(trial, plain, 3)
    assert set(trial.params) == {"lr_scale", "train_epochs", "augment", "bn_policy", "ema_decay", "tta"}  # no decay,
    # smoothing or groups where the recipe has none
    assert changes["lrs"]["all"] == pytest.approx(1e-3 * trial.params["lr_scale"]) and 1 <= changes["train_epochs"] <= 3
    assert study.trials[0].distributions["ema_decay"].choices == (0.0, 0.9, 0.98)
    modern = get_experiment("modern_finetune").RECIPE
    trial = study.ask()
    changes = suggest(trial, modern, 12)
    p = trial.params
    assert changes["lrs"]["head"] == pytest.approx(1e-3 * p["lr_scale"])
    assert changes["lrs"]["body"] == pytest.approx(1e-4 * p["lr_scale"] * p["body_factor"])
    assert changes["first_lrs"]["head"] == pytest.approx(3e-3 * p["lr_scale"]) and 2 <= changes["train_epochs"] <= 12


# ----------------------------------------------------------------------------- where a tuned file names its study
def test_a_tuned_file_names_its_study_by_no_absolute_path(tmp_path, monkeypatch):
    """tuning.recorded_path: the study's file as a committed tuned file records it, relative to the
    cache folder or the working folder, else by its name alone; never a machine's absolute path."""
    from tl.engine.tuning import recorded_path

    cache, work = tmp_path / "home" / ".cache" / "tl", tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert recorded_path(cache / "tuning" / "r-d.db", cache) == "$TL_CACHE_DIR/tuning/r-d.db"
    assert recorded_path(work / "studies" / "s.db", cache) == "studies/s.db"
    assert recorded_path(Path("studies/s.db"), cache) == "studies/s.db"
    assert recorded_path(tmp_path / "elsewhere" / "s.db", cache) == "s.db"
    for path in (cache / "tuning" / "r-d.db", work / "s.db", tmp_path / "elsewhere" / "s.db"):
        assert not Path(recorded_path(path, cache)).is_absolute() and str(tmp_path) not in recorded_path(path, cache)


# ----------------------------------------------------------------------------- a study on a database server
@pytest.mark.parametrize("given, taken", [
    ("studies/s.db", Path("studies/s.db")),
    ("sqlite:///studies/s.db", Path("studies/s.db")),  # a SQLite URL is its file: checked as a path is
    ("sqlite:////abs/s.db", Path("/abs/s.db")),
    ("postgresql://u:pw@host:5432/db", "postgresql://u:pw@host:5432/db"),
    ("mysql+pymysql://u@h/db", "mysql+pymysql://u@h/db"),
])
def test_storage_is_a_sqlite_file_or_a_database_url(given, taken):
    from tl.engine.tuning import storage_arg

    assert storage_arg(given) == taken


@pytest.mark.parametrize("url, shown, recorded", [
    ("postgresql://tl:s3cret@db.lab:5432/studies", "postgresql://tl:***@db.lab:5432/studies",
     "postgresql://tl:***@db.lab:5432/studies"),
    ("postgresql+psycopg2://tl:p%40s3cret@db.lab/studies?sslmode=require&password=s3cret",
     "postgresql+psycopg2://tl:***@db.lab/studies?sslmode=require",
     "postgresql+psycopg2://tl:***@db.lab/studies"),
    ("postgresql://postgres:s3cret@/postgres?host=/tmp/pgdir", "postgresql://postgres:***@/postgres?host=%2Ftmp%2Fpgdir",
     "postgresql://postgres:***@/postgres"),  # a socket's folder is this machine's
    ("mysql://tl@db.lab/studies", "mysql://tl@db.lab/studies", "mysql://tl@db.lab/studies"),
    ("postgresql://tl:s3cret@db.lab:fivefour/studies", "postgresql://...", "postgresql://..."),  # unreadable
])
def test_a_database_url_is_shown_without_its_password_and_recorded_without_this_machine(tmp_path, url, shown,
                                                                                        recorded):
    from tl.engine.tuning import shown_storage

    assert shown_storage(url) == shown and shown_storage(url, tmp_path) == recorded
    assert shown_storage(tmp_path / "s.db", tmp_path) == "$TL_CACHE_DIR/s.db"  # a file: tuning.recorded_path


def test_postgresql_without_a_driver_gets_the_installed_one_or_says_what_to_install(monkeypatch):
    import importlib.util

    from tl import TLError
    from tl.engine.tuning import database_url

    installed = {name for name in ("psycopg", "psycopg2") if importlib.util.find_spec(name)}
    if installed:
        assert database_url("postgresql://u:pw@h/db").split("://")[0] in {f"postgresql+{d}" for d in installed}
    assert database_url("postgresql+psycopg2://u:pw@h/db") == "postgresql+psycopg2://u:pw@h/db"  # named: kept
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TLError, match=r"postgresql://u:\*\*\*@h/db: no PostgreSQL driver is installed: pip install "
                                      r"psycopg2-binary") as caught:
        database_url("postgresql://u:pw@h/db")
    assert "pw" not in str(caught.value)


@pytest.mark.parametrize("url", ["postgresql://tl:s3cret@/studies?host=/nonexistent-folder",
                                 "postgresql+psycopg2://tl:s3cret@127.0.0.1:1/studies",
                                 "nosuchdatabase://tl:s3cret@h/db",
                                 "postgresql://tl:s3cret@h:port/db"])
def test_a_database_that_cannot_be_used_is_one_line_without_its_password(url):
    from tl import TLError
    from tl.engine.tuning import make_storage, storage_arg

    with pytest.raises(TLError) as caught:
        make_storage(storage_arg(url))
    said = str(caught.value)
    assert said.startswith("--storage ") and "s3cret" not in said and "\n" not in said, said
    if "is not a database URL" in said:  # perhaps a password's special character: how to write one
        assert "percent-encoded, @ as %40" in said, said


# ----------------------------------------------------------------------------- a study file left half-made or damaged
@pytest.mark.parametrize("kept", [("studies",), ("studies", "study_directions", "trials"), ("version_info",)])
def test_a_study_file_whose_creation_was_interrupted_is_completed_not_refused(tmp_path, kept):
    """Optuna creates a study file's tables in several commits: a search killed or interrupted
    while it opens a new study leaves only some of them, and the same command run again goes on."""
    import sqlite3

    from tl.engine.tuning import OPTUNA_TABLES, check_storage_file, open_study

    path = tmp_path / "study.db"
    tuning.make_storage(path)
    with sqlite3.connect(path) as db:
        for table in OPTUNA_TABLES - set(kept):
            db.execute(f"DROP TABLE IF EXISTS {table}")
    check_storage_file(path)
    study = open_study(path, "s", {"recipe": "r", "dataset": "d", "data_fingerprint": "f"}, seed=0)
    assert study.user_attrs["setup"]["recipe"] == "r"


@pytest.mark.parametrize("tables", [("photos",), ("studies", "photos"), ("trials", "version_info", "notes"),
                                    ("studies",)])
def test_a_sqlite_file_of_another_program_is_refused_and_kept(tmp_path, tables):
    import sqlite3

    from tl.engine.tuning import check_storage_file

    path = tmp_path / "other.db"
    with sqlite3.connect(path) as db:
        for table in tables:
            db.execute(f"CREATE TABLE {table} (x)")
    before = path.read_bytes()
    with pytest.raises(TLError, match="SQLite file of another program"):
        check_storage_file(path)
    assert path.read_bytes() == before


@pytest.fixture(scope="module")
def six_trials(tmp_path_factory) -> bytes:
    """The bytes of a study file holding six finished trials."""
    path = tmp_path_factory.mktemp("study") / "study.db"
    study = tuning.open_study(path, "s", {"recipe": "r", "dataset": "d", "data_fingerprint": "f"}, seed=0)
    study.optimize(lambda t: t.suggest_float("x", 0, 1) + t.suggest_int("n", 1, 5), n_trials=6)
    return path.read_bytes()


@pytest.mark.parametrize("page", [1, 2, 9, 25, -1])  # 4 KiB pages; 25: 100 KiB into the file; -1: the last page
def test_a_study_file_damaged_inside_one_page_is_refused_and_kept(tmp_path, six_trials, page):
    """Random bytes over one page that the table list does not read (a disk's or a copy's damage):
    SQLite's quick_check finds it before the search writes anything."""
    import random

    from tl.engine.tuning import check_storage_file

    at = (page % (len(six_trials) // 4096)) * 4096
    path = tmp_path / "study.db"
    path.write_bytes(six_trials[:at] + random.Random(page).randbytes(4096) + six_trials[at + 4096:])
    before = path.read_bytes()
    with pytest.raises(TLError, match=r"--storage .*study\.db( is damaged \(SQLite's quick_check: .+\)|: SQLite cannot "
                                      r"read it \(.+\)); it is left as it is: repair it") as caught:
        check_storage_file(path)
    assert "\n" not in str(caught.value) and path.read_bytes() == before


class _DriverError(Exception):
    """An error of a PostgreSQL driver (its module is psycopg2's)."""


_DriverError.__module__ = "psycopg2.errors"


def _raised_on_top(first: BaseException, then: BaseException):
    """`then` raised while `first` was handled, as Optuna raises its own error over a storage's."""
    try:
        raise first
    except BaseException:  # noqa: BLE001
        raise then  # noqa: B904 - the implicit __context__ is the point


@pytest.mark.parametrize("failure, says", [
    ("storage", "it is left as it is: run the same command again"),
    ("sqlalchemy", "repair it (sqlite3's .recover)"),
    ("sqlite", "repair it (sqlite3's .recover)"),
    ("full disk, then Optuna's AssertionError", "database or disk is full); free some space"),
    ("read-only, then Optuna's AssertionError", "make it writable"),
    ("server gone, then UnboundLocalError", "server closed the connection unexpectedly); it is left as it is: run"),
    ("server gone, caused", "server closed the connection unexpectedly); it is left as it is: run"),
])
def test_a_study_database_that_fails_mid_search_is_one_error(tmp_path, failure, says):
    """Whatever a library raises on top of the database's own error (Optuna's "Should not reach.",
    an UnboundLocalError in its cleanup): one TLError naming the storage and what failed."""
    import sqlite3

    import optuna
    from sqlalchemy.exc import OperationalError

    from tl.engine.tuning import storage_errors

    def sqlalchemy(text):
        return OperationalError("INSERT INTO trial_values", {}, sqlite3.OperationalError(text))

    def failing():
        if failure == "storage":
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit")
        if failure == "sqlalchemy":
            raise OperationalError("SELECT 1", {}, sqlite3.DatabaseError("database disk image is malformed"))
        if failure == "sqlite":
            raise sqlite3.DatabaseError("database disk image is malformed")
        if failure.startswith("full"):
            _raised_on_top(sqlalchemy("database or disk is full"), AssertionError("Should not reach."))
        if failure.startswith("read-only"):
            _raised_on_top(sqlalchemy("attempt to write a readonly database"), AssertionError("Should not reach."))
        gone = _DriverError("server closed the connection unexpectedly\nThis probably means ...")
        if failure.endswith("caused"):
            raise RuntimeError("the trial could not be told") from gone
        _raised_on_top(gone, UnboundLocalError("cannot access local variable 'frozen_trial'"))

    with pytest.raises(TLError, match=r"--storage .*study\.db: the study database failed \(.+\); ") as caught:
        with storage_errors(tmp_path / "study.db"):
            failing()
    assert says in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


def test_an_error_that_is_not_the_databases_goes_on_as_it_is(tmp_path):
    from tl.engine.tuning import storage_errors

    for error in (AssertionError("a bug"), TLError("said already")):
        with pytest.raises(type(error)) as caught, storage_errors(tmp_path / "study.db"):
            raise error
        assert caught.value is error


def test_a_database_failure_in_another_thread_prints_no_traceback(tmp_path, monkeypatch):
    """Optuna's heartbeat thread meets the failing database first: its traceback is left out (the
    search says the failure in its one line); another thread's other error is reported as before."""
    import sqlite3
    import threading

    from sqlalchemy.exc import OperationalError

    from tl.engine.tuning import storage_errors

    reported = []

    def recorder(failed):
        reported.append(type(failed.exc_value))

    monkeypatch.setattr(threading, "excepthook", recorder)
    failures = [OperationalError("UPDATE trial_heartbeats", {}, sqlite3.OperationalError("database is locked")),
                sqlite3.DatabaseError("database disk image is malformed"), ValueError("a bug")]
    with storage_errors(tmp_path / "study.db"):
        for failure in failures:
            thread = threading.Thread(target=lambda f=failure: (_ for _ in ()).throw(f))
            thread.start()
            thread.join()
    assert reported == [ValueError] and threading.excepthook is recorder  # given back after the search


def test_a_new_study_file_on_a_really_full_disk_leaves_nothing(full_tmpfs):
    """SQLite creates the file, then finds no room for its first page: one error saying the disk
    is full, and no empty study file left behind (a real full tmpfs; skipped where not root)."""
    from tests.helpers import fill

    fill(full_tmpfs, 0)
    for _ in range(2):  # the second try meets the same disk, not a file left by the first
        with pytest.raises(TLError, match=r"database or disk is full\); free some space or choose another --storage"):
            tuning.make_storage(full_tmpfs / "study.db")
        assert sorted(p.name for p in full_tmpfs.rglob("*")) == [".filler"]


def _finished(values: dict[int, float]):
    import optuna

    return optuna.trial.create_trial(value=max(values.values()), intermediate_values=values)


@pytest.mark.parametrize("completed_at_step_10, pruned", [(1, False), (2, False), (3, True), (5, True)])
def test_a_late_epoch_is_pruned_only_against_the_median_of_several_completed_trials(tmp_path, completed_at_step_10,
                                                                                    pruned):
    """Long schedules are rare among the first trials: at epoch 10 the median of one or two
    completed trials is one of their accuracies, and a trial one image below it would be stopped."""
    study = tuning.open_study(tmp_path / "study.db", "s", {"recipe": "r", "dataset": "d", "data_fingerprint": "f"},
                              seed=0)
    for _ in range(5):  # short schedules: the pruner's startup trials, none reaching epoch 10
        study.add_trial(_finished({e: 0.9 for e in range(5)}))
    for _ in range(completed_at_step_10):
        study.add_trial(_finished({e: 1.0 for e in range(11)}))
    trial = study.ask()
    for epoch in range(11):
        trial.report(0.98, epoch)
    assert bool(trial.should_prune()) is pruned
