"""Tuning without peeking (experiments/tune.py): the inner split carved from train, a search
that never reads val/ or test/, its study file (continued, refused when it belongs to another
recipe or data set) and what it writes: the tuned numbers, the pages, the `tuned_<recipe>` recipe;
a search as real processes: killed mid-trial and run again at once, interrupted with Ctrl-C, and
shared by two processes on a PostgreSQL server, of which one writes the results."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import _SEEN, _WATCHED, write_image_folder
from tests.helpers import interruptible

pytestmark = pytest.mark.usefixtures("own_cache_dir")


# ----------------------------------------------------------------------------- the search
def _tune(tmp_path: Path, data: Path, weights: Path, *extra: str) -> int:
    from experiments import tune
    from tl.engine.command import command  # as `python -m experiments.tune` runs it

    return command(lambda: tune.main([
        "--recipe", "modern_finetune", "--data", str(data), "--backbone", "tiny", "--weights", str(weights), "--quick",
        "--out", str(tmp_path / "pages"), "--tuned-dir", str(tmp_path / "tuned"),
        "--runs-dir", str(tmp_path / "trials"), "--storage", str(tmp_path / "study.db"), *extra]))


def _study(tmp_path: Path):
    import optuna

    return optuna.load_study(study_name=None, storage=f"sqlite:///{tmp_path / 'study.db'}")


def test_a_search_reads_no_val_or_test_image_and_its_recipe_trains(sealed, pretrained, tmp_path, monkeypatch, capsys):
    import main
    from experiments import get_experiment

    assert _tune(tmp_path, sealed, pretrained, "--trials", "2") == 0
    assert not _SEEN, f"the search read val/ or test/: {_SEEN[:3]}"
    _WATCHED.clear()  # from here on, the tuned recipe trains and is scored like any other
    tuned = json.loads((tmp_path / "tuned" / "modern_finetune-sealed-tiny.json").read_text())
    assert tuned["trials"] == {"budget": 2, "complete": 2, "pruned": 0, "fail": 0}
    assert tuned["inner_split"] == {"inner_val": 0.2, "folds": None, "seed": 0} and tuned["backbone"] == "tiny"
    assert 0 <= tuned["best_inner_score"] <= 1 and tuned["command"].startswith("python -m experiments.tune --recipe")
    assert set(tuned["params"]) == {"lr_scale", "body_factor", "weight_decay", "train_epochs", "label_smoothing",
                                    "augment", "bn_policy", "ema_decay", "tta"}
    pages = tmp_path / "pages" / "modern_finetune-sealed-tiny"
    assert {p.name for p in pages.iterdir()} == {"trials.md", "trials.csv", "history.png", "importance.png"}
    table = (pages / "trials.csv").read_text().splitlines()
    assert len(table) == 3 and table[0].startswith("number,state,inner_score,last_epoch,duration_s,cpu_s,param ")
    assert "Budget: 2 finished trials" in (pages / "trials.md").read_text()
    assert not list((tmp_path / "trials").rglob("*.pth"))  # trial runs keep their records, not their weights
    configs = [json.loads(p.read_text()) for p in (tmp_path / "trials").rglob("config.json")]
    assert len(configs) == 2 and all(c["options"]["inner_val"] == 0.2 for c in configs)

    monkeypatch.setenv("TL_TUNED_DIR", str(tmp_path / "tuned"))
    recipe = get_experiment("tuned_modern_finetune", sealed).RECIPE
    assert recipe.name == "tuned_modern_finetune" and "modern_finetune-sealed-tiny.json" in recipe.source
    assert all(getattr(recipe, k) == v for k, v in tuned["recipe_fields"].items())
    assert get_experiment("tuned_modern_finetune").RECIPE == recipe  # the one tuned file there is
    capsys.readouterr()
    assert tuned["recipe_fields"]["weights"] == str(pretrained)  # the tuned recipe starts where the search did
    assert main.main(["-e", "tuned_modern_finetune", "--data", str(sealed), "--quick",
                      "--out", str(tmp_path / "runs"), "--no-progress"]) == 0
    assert "headline acc" in capsys.readouterr().out
    assert main.main(["-e", "tuned_modern_finetune", "--data", str(tmp_path / "elsewhere")]) == 2
    assert "no numbers tuned for modern_finetune on elsewhere" in capsys.readouterr().err


def test_an_interrupted_search_goes_on_with_the_missing_trials(tiny_data, pretrained, tmp_path, monkeypatch, capsys):
    from experiments import tune

    real = tune.score_trial

    def interrupted_at_trial_1(trial, s, log=print):
        if trial.number == 1:
            raise KeyboardInterrupt
        return real(trial, s, log)

    monkeypatch.setattr(tune, "score_trial", interrupted_at_trial_1)
    assert _tune(tmp_path, tiny_data, pretrained, "--trials", "2") == 130
    assert "error: interrupted" in capsys.readouterr().err
    assert [t.state.name for t in _study(tmp_path).trials] == ["COMPLETE", "FAIL"]  # kept in the file
    monkeypatch.setattr(tune, "score_trial", real)
    assert _tune(tmp_path, tiny_data, pretrained, "--trials", "2") == 0
    assert "1 of 2 trials finished; running 1" in capsys.readouterr().out
    assert [t.state.name for t in _study(tmp_path).trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert _tune(tmp_path, tiny_data, pretrained, "--trials", "2") == 0  # the budget is reached: nothing runs
    assert "2 of 2 trials finished; running 0" in capsys.readouterr().out
    assert len(_study(tmp_path).trials) == 3


def test_k_fold_scores_a_trial_by_the_mean_over_its_folds(tiny_data, pretrained, tmp_path):
    assert _tune(tmp_path, tiny_data, pretrained, "--trials", "1", "--folds", "2") == 0
    configs = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "trials").rglob("config.json")}
    assert sorted(configs) == ["trial0000-fold0", "trial0000-fold1"]
    assert [configs[name]["options"]["inner_fold"] for name in sorted(configs)] == [0, 1]
    mean = sum(c["results"]["headline_acc"] for c in configs.values()) / 2
    tuned = json.loads((tmp_path / "tuned" / "modern_finetune-tiny-tiny.json").read_text())
    assert tuned["best_inner_score"] == pytest.approx(mean)
    assert tuned["inner_split"] == {"inner_val": None, "folds": 2, "seed": 0}


def test_a_pruned_trial_stops_and_leaves_no_run_behind(tiny_data, pretrained, tmp_path, monkeypatch, capsys):
    import optuna

    monkeypatch.setattr(optuna.pruners, "MedianPruner",  # every accuracy is below 2: pruned after epoch 1 of 2
                        lambda **kw: optuna.pruners.ThresholdPruner(lower=2.0, n_warmup_steps=1))
    assert _tune(tmp_path, tiny_data, pretrained, "--trials", "2") == 0
    trials = _study(tmp_path).trials
    assert [t.state.name for t in trials] == ["PRUNED", "PRUNED"]
    assert all(list(t.intermediate_values) == [0, 1] and t.params["train_epochs"] == 2 for t in trials)
    assert not any((tmp_path / "trials").iterdir())
    assert not (tmp_path / "tuned").exists() and "no tuned numbers written" in capsys.readouterr().out
    assert (tmp_path / "pages" / "modern_finetune-tiny-tiny" / "importance.png").is_file()


def test_the_recorded_command_names_no_folder_of_this_machine(tmp_path, monkeypatch):
    """Every path argument as tuning.recorded_path shows the study file (relative to the working
    folder or $TL_CACHE_DIR, else elided to its name); a URL without password or ?host= folder."""
    from experiments import tune

    cache, work = tmp_path / "cache", tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("TL_CACHE_DIR", str(cache))
    argv = ["--recipe", "modern_finetune", "--trials", "2", "--data", str(tmp_path / "data" / "bees"),
            "--weights", str(tmp_path / "w.pth"), "--storage", str(cache / "tuning" / "s.db"),
            f"--out={work / 'results' / 'tuning'}", "--tuned-dir", str(work / "tuned"), "--runs-dir=runs/t"]
    assert tune.shown_argv(tune.parse_args(argv), argv)[4:] == [
        "--data", ".../bees", "--weights", ".../w.pth", "--storage", "$TL_CACHE_DIR/tuning/s.db",
        "--out=results/tuning", "--tuned-dir", "tuned", "--runs-dir=runs/t"]
    for storage, shown in ((f"postgresql://tl:s3cret@/studies?host={tmp_path}/pg", "postgresql://tl:***@/studies"),
                           (f"sqlite:///{tmp_path}/elsewhere/s.db", ".../s.db"),
                           ("mysql://tl@db.lab:3306/studies?password=s3cret", "mysql://tl@db.lab:3306/studies")):
        argv = ["--recipe", "modern_finetune", "--trials", "2", "--weights", "none", f"--storage={storage}"]
        assert tune.shown_argv(tune.parse_args(argv), argv)[-2:] == ["none", f"--storage={shown}"]


# ----------------------------------------------------------------------------- refused, in one line
def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("other", [{"recipe": "two_stage"}, {"dataset": "dogs-vs-cats"}])
def test_a_study_file_of_another_recipe_or_data_set_is_refused(tiny_data, pretrained, tmp_path, capsys, other):
    from tl.engine import tuning

    theirs = {"recipe": "modern_finetune", "dataset": "tiny", "data_fingerprint": "?"} | other
    tuning.open_study(tmp_path / "study.db", "theirs", theirs, seed=0)
    capsys.readouterr()  # Optuna's own log line
    assert _tune(tmp_path, tiny_data, pretrained, "--trials", "1") == 2
    assert f"holds study 'theirs' with another {next(iter(other))}" in _one_error(capsys)
    assert not (tmp_path / "trials").exists()


@pytest.mark.parametrize("name", ["second", "modern_finetune-tiny-tiny"])
def test_a_study_of_another_name_does_not_replace_a_tuned_file(tiny_data, pretrained, tmp_path, capsys, name):
    """The tuned file names its study; a search under another --study-name that would write the same
    tuned file is refused before its first trial (the default name too, after a named study)."""
    (tmp_path / "tuned").mkdir()
    kept = json.dumps({"recipe": "modern_finetune", "study": {"storage": "s.db", "name": f"not-{name}"}})
    (tmp_path / "tuned" / "modern_finetune-tiny-tiny.json").write_text(kept)
    argv = ["--trials", "1"] + (["--study-name", name] if name == "second" else [])
    assert _tune(tmp_path, tiny_data, pretrained, *argv) == 2
    assert f"holds the numbers of study 'not-{name}', not of this search's study '{name}'" in _one_error(capsys)
    assert (tmp_path / "tuned" / "modern_finetune-tiny-tiny.json").read_text() == kept
    assert not (tmp_path / "trials").exists()


@pytest.mark.parametrize("argv, words", [(["--trials", "0"], "--trials must be at least 1"),
                                         (["--trials", "1", "--inner-val", "1.5"], "--inner-val must be between 0"),
                                         (["--trials", "1", "--inner-val", "0"], "--inner-val must be between 0"),
                                         (["--trials", "1", "--folds", "1"], "--folds must be at least 2"),
                                         (["--trials", "1", "--max-epochs", "1"], "--quick draws at most 2 epochs"),
                                         (["--trials", "1", "--max-epochs", "5"], "--quick draws at most 2 epochs")])
def test_bad_numbers_are_refused(tiny_data, pretrained, tmp_path, capsys, argv, words):
    assert _tune(tmp_path, tiny_data, pretrained, *argv) == 2
    assert words in _one_error(capsys)


def test_a_class_too_small_for_an_inner_val_is_refused(tmp_path, pretrained, capsys):
    data = write_image_folder(tmp_path / "small", train=1, val=2, size=16)
    assert _tune(tmp_path, data, pretrained, "--trials", "1") == 2
    assert "too few training images to carve an inner val" in _one_error(capsys)


# ----------------------------------------------------------------------------- compare_all


def _foreign_sqlite(path: Path) -> Path:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE studies (x INTEGER)")
        db.commit()
    return path


def _damaged_study(path: Path) -> Path:
    """A study file of two trials whose third page is overwritten with random bytes."""
    import random

    from tl.engine import tuning

    study = tuning.open_study(path, "s", {"recipe": "modern_finetune", "dataset": "tiny", "data_fingerprint": "?"}, 0)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    data = path.read_bytes()
    path.write_bytes(data[:8192] + random.Random(0).randbytes(4096) + data[12288:])
    return path


def _tune_with_storage(tmp_path: Path, data: Path, backbone: str, storage: Path, *extra) -> int:
    from experiments import tune

    return tune.main([str(a) for a in ("--recipe", "modern_finetune", "--data", data, "--backbone", backbone,
                                       "--weights", "none", "--quick", "--out", tmp_path / "pages", "--tuned-dir",
                                       tmp_path / "tuned", "--runs-dir", tmp_path / "trials", "--storage", storage,
                                       *extra)])


@pytest.mark.parametrize("make, says", [
    (lambda p: p.write_text("my notes\n") and p, "is not a SQLite file"),
    (lambda p: (p.write_text("x"), p / "study.db")[1], "is a file, not a folder"),
    (lambda p: (p.mkdir(), p)[1], "is a folder"),
    (_foreign_sqlite, "is a SQLite file of another program"),
    (lambda p: (p.write_bytes(b"SQLite format 3\x00" + b"garbage" * 20), p)[1], "SQLite cannot read it"),
    (_damaged_study, "is damaged (SQLite's quick_check: "),
])
def test_a_storage_that_is_not_a_study_file_is_refused_and_kept(tiny_data, tiny_backbone, tmp_path, capsys, make,
                                                                 says):
    storage = make(tmp_path / "store.db")
    before = {p: p.read_bytes() for p in tmp_path.rglob("store.db*") if p.is_file()}
    assert _tune_with_storage(tmp_path, tiny_data, tiny_backbone, storage, "--trials", 1) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --storage") and says in err and "Traceback" not in err, err
    assert {p: p.read_bytes() for p in tmp_path.rglob("store.db*") if p.is_file()} == before
    assert not (tmp_path / "trials").exists()


def test_a_study_database_that_fails_mid_trial_is_one_error_line(tiny_data, tiny_backbone, tmp_path, monkeypatch,
                                                                   capsys):
    """The disk fills while a trial reports its epoch, and Optuna raises its own AssertionError on
    top of SQLite's error: one line saying the disk is full, exit 2."""
    import sqlite3

    import optuna
    from sqlalchemy.exc import OperationalError

    def full(*args, **kwargs):
        try:
            raise OperationalError("INSERT", {}, sqlite3.OperationalError("database or disk is full"))
        except OperationalError:
            raise AssertionError("Should not reach.")  # noqa: B904 - as Optuna raises it

    monkeypatch.setattr(optuna.storages.RDBStorage, "set_trial_intermediate_value", full)
    assert _tune_with_storage(tmp_path, tiny_data, tiny_backbone, tmp_path / "study.db", "--trials", 1) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"error: --storage {tmp_path / 'study.db'}: the study database failed (database or "
                                f"disk is full); free some space (the finished trials are kept), or choose another "
                                f"--storage"], err


def _has_trials_table(path: Path) -> bool:
    import sqlite3

    with contextlib.closing(sqlite3.connect(path)) as db:
        return bool(db.execute("SELECT name FROM sqlite_master WHERE name = 'trials'").fetchall())


def test_a_search_on_a_really_full_disk_fails_cleanly_then_goes_on(tiny_data, tiny_backbone, tmp_path, capfd,
                                                                     full_tmpfs):
    """Study file, trial runs, pages and tuned file on one disk that is full at one write after
    another (0, 1, 4, 16, ... pages of 4 KiB free): each try ends with one error line and exit
    2, leaves no empty file, no half-made study file and no empty folder, and the next try, with more room, goes on
    from what the last one kept until the search finishes."""
    from tests.helpers import fill
    from tl.engine.command import command

    def search() -> int:
        return command(lambda: _tune_with_storage(full_tmpfs / "d", tiny_data, tiny_backbone,
                                                  full_tmpfs / "d" / "study.db", "--trials", 1))

    tries = 0
    for pages in (0, 1, 2, 4, 8, 16, 32, 64, 256, 900):
        fill(full_tmpfs, pages)
        code, err = search(), capfd.readouterr().err
        if code == 0:
            break
        tries += 1
        assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), (pages, err)
        left = [p for p in full_tmpfs.rglob("*") if p.name != ".filler"]
        # (a run folder's lock file is empty while no process holds it: tl/engine/folder_lock.py)
        assert not [p for p in left if p.is_file() and p.stat().st_size == 0 and p.suffix != ".lock"], (pages, left)
        assert not (full_tmpfs / "d" / "study.db").exists() or _has_trials_table(full_tmpfs / "d" / "study.db"), pages
        assert not [p for p in left if p.is_dir() and not any(p.iterdir())], (pages, left)
    assert code == 0 and tries >= 3, f"{tries} tries failed before one fitted"
    assert (full_tmpfs / "d" / "tuned" / "modern_finetune-tiny-tiny.json").is_file()


# ----------------------------------------------------------------------------- a search as processes
ROOT = Path(__file__).resolve().parents[2]
KEY = "modern_finetune-tiny-tiny"  # <recipe>-<data set>-<backbone>


def _argv(tmp_path: Path, storage, *extra) -> list[str]:
    return [sys.executable, str(ROOT / "tests" / "tune_main.py"), "--recipe", "modern_finetune", "--data",
            str(tmp_path / "tiny"), "--backbone", "tiny", "--weights", "none", "--quick", "--workers", "0",
            "--device", "cpu", "--out", str(tmp_path / "pages"), "--tuned-dir", str(tmp_path / "tuned"),
            "--runs-dir", str(tmp_path / "trials"), "--storage", str(storage), *map(str, extra)]


def _env(tmp_path: Path, **extra) -> dict:
    return {**os.environ, "TL_CACHE_DIR": str(tmp_path / "cache"), **extra}


def _start(tmp_path: Path, name: str, argv: list[str], **env) -> subprocess.Popen:
    with open(tmp_path / f"{name}.out", "w") as out, open(tmp_path / f"{name}.err", "w") as err:
        return subprocess.Popen(argv, cwd=ROOT, env=_env(tmp_path, **env), stdout=out, stderr=err,
                                preexec_fn=interruptible)


def _wait_for(child: subprocess.Popen, log: Path, text: str) -> None:
    deadline = time.monotonic() + 240
    while text not in log.read_text():
        assert child.poll() is None and time.monotonic() < deadline, (log.read_text(), child.returncode)
        time.sleep(0.1)


def _distinct(trials) -> bool:
    seen = [tuple(sorted(t.params.items())) for t in trials]
    return len(seen) == len(set(seen))


def test_a_search_killed_mid_trial_and_run_again_at_once_tries_new_numbers(tiny_data, tiny_backbone, tmp_path,
                                                                          monkeypatch, capsys):
    """SIGKILL mid-trial (no word, no cleanup), then the same command at once (here, in this
    process): the killed trial is failed and named, its numbers are tried once more as a
    labelled retry, and no other numbers repeat (a sampler that restarted from its seed's
    state repeated trial 0's)."""
    from experiments import tune
    from tl.engine.trials import failures, retries

    argv = _argv(tmp_path, tmp_path / "study.db", "--trials", 3)
    first = _start(tmp_path, "first", argv, TL_TEST_HOLD_TRIAL="1")
    try:
        _wait_for(first, tmp_path / "first.out", "holding trial 1")
    finally:
        first.kill()
        first.wait()
    monkeypatch.setenv("TL_CACHE_DIR", str(tmp_path / "cache"))
    assert tune.main(argv[2:]) == 0
    assert "1 of 3 trials finished; running 2" in capsys.readouterr().out

    study = _study(tmp_path)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    why = f"its process (host {study.trials[1].user_attrs['process']['host']}, pid {first.pid}) was gone when the " \
          f"search was opened again"
    assert failures(study) == {1: why} and retries(study) == {2: 1}
    assert study.trials[2].params == study.trials[1].params
    assert _distinct(study.trials[:2] + study.trials[3:])
    page = (tmp_path / "pages" / KEY / "trials.md").read_text()
    assert f"- trial 1 failed: {why}" in page and "- trial 2 tries again the numbers of trial 1" in page
    tuned = json.loads((tmp_path / "tuned" / f"{KEY}.json").read_text())
    assert tuned["failed_trials"] == {"1": why} and tuned["retries"] == {"2": 1} and tuned["over_budget"] == 0
    assert "was gone" in (tmp_path / "pages" / KEY / "trials.csv").read_text()


def test_ctrl_c_or_sigterm_is_one_error_line_and_the_signals_exit_status(tiny_data, tmp_path):
    """Two search processes at once: SIGTERM mid-trial followed at once by two Ctrl-C (143: the
    first signal counts), and Ctrl-C whose KeyboardInterrupt Python swallows in the garbage
    collection Optuna runs after a trial (it still stops the search: 130). Each prints one
    `error:` line and nothing else, and a trial it stopped is failed and labelled by its signal."""
    cases = {"term": ({"TL_TEST_HOLD_TRIAL": "0"}, [signal.SIGTERM, signal.SIGINT, signal.SIGINT], 143),
             "swallowed": ({"TL_TEST_SWALLOWED": "SIGINT del"}, [], 130)}
    children = {}
    for name, (env, _, _) in cases.items():
        argv = _argv(tmp_path / name, tmp_path / name / "study.db", "--trials", 2)
        argv[argv.index("--data") + 1] = str(tiny_data)
        children[name] = _start(tmp_path, name, argv, **env)
    try:
        for name, (_, signals, _) in cases.items():
            if signals:
                _wait_for(children[name], tmp_path / f"{name}.out", "holding trial 0")
            for signum in signals:
                children[name].send_signal(signum)
                time.sleep(0.05)
        for child in children.values():
            child.wait(timeout=120)
    finally:
        for child in children.values():
            child.kill()
            child.wait()
    for name, (_, _, status) in cases.items():
        err = (tmp_path / f"{name}.err").read_text()
        assert (children[name].returncode, err.splitlines()) == (status, [
            f"error: interrupted: the study in {tmp_path / name / 'study.db'} keeps its finished trials; run the "
            f"same command again to go on"]), (name, err)
    from tl.engine.trials import failures

    states = {name: [t.state.name for t in _study(tmp_path / name).trials] for name in cases}
    assert states == {"term": ["FAIL"], "swallowed": ["COMPLETE"]}  # the second trial never started
    assert failures(_study(tmp_path / "term"))[0].startswith("interrupted (SIGTERM): stopped by a kill")


# ----------------------------------------------------------------------------- a shared search
def _postgres():
    """A PostgreSQL server from pip (pgserver) in a folder of its own, or the test's skip
    (not under CI on the platforms pgserver has wheels for: there it must start)."""
    must = (os.environ.get("CI") == "true" and sys.platform == "linux" and platform.machine() == "x86_64"
            and (3, 10) <= sys.version_info[:2] < (3, 13))
    try:
        import pgserver

        from tl.engine.tuning import database_url

        database_url("postgresql://x@/y")  # a driver SQLAlchemy can use is installed
        folder = tempfile.mkdtemp(prefix="pg")  # short: the server's socket path has at most 107 characters
        return pgserver.get_server(folder, cleanup_mode="stop")
    except Exception as exc:  # noqa: BLE001 - whatever stops the server is the skip's reason
        if must:
            pytest.fail(f"PostgreSQL (pgserver) did not start, and CI must run this test: {exc}")
        pytest.skip(f"PostgreSQL (pgserver) cannot start here: {type(exc).__name__}: {exc}")


def test_two_processes_share_a_search_on_a_postgresql_server(tiny_data, tmp_path):
    """Two search processes, one study on a real server, a budget of 4: no numbers repeat, the
    budget is exceeded by at most 1, one process writes the one tuned file, which holds no password."""
    import optuna
    from sqlalchemy.engine import make_url

    from tl.engine.tuning import database_url

    server = _postgres()
    try:
        url = make_url(server.get_uri()).set(password="s3cret-pw").render_as_string(hide_password=False)
        argv = _argv(tmp_path, url, "--trials", 4)
        children = [_start(tmp_path, f"w{i}", argv) for i in range(2)]
        for child in children:
            child.wait(timeout=300)
        outs = [(tmp_path / f"w{i}.out").read_text() for i in range(2)]
        assert [c.returncode for c in children] == [0, 0], [(tmp_path / f"w{i}.err").read_text() for i in range(2)]
        everyone = optuna.load_study(study_name=None, storage=database_url(url)).trials
        finished = [t for t in everyone if t.state.name in ("COMPLETE", "PRUNED")]
    except Exception:
        print((Path(server.pgdata) / "log").read_text()[-3000:])  # the server's own account, shown on failure
        raise
    finally:
        server.cleanup()
        shutil.rmtree(server.pgdata, ignore_errors=True)
    assert 4 <= len(finished) <= 5 and len(everyone) == len(finished) and _distinct(everyone)
    assert {t.user_attrs["process"]["pid"] for t in everyone} <= {c.pid for c in children}
    writers = [out for out in outs if "best: trial" in out]
    assert len(writers) == 1, outs
    other = outs[1 - outs.index(writers[0])]
    assert "still run in other processes" in other or "were written by host" in other, other
    assert [p.name for p in (tmp_path / "tuned").iterdir()] == [f"{KEY}.json"]
    text = (tmp_path / "tuned" / f"{KEY}.json").read_text()
    tuned = json.loads(text)
    assert tuned["study"]["storage"] == "postgresql://postgres:***@/postgres"  # no password, no socket folder
    assert "s3cret" not in text and "--storage 'postgresql://postgres:***@/postgres' " in tuned["command"]
    assert "host=" not in tuned["command"] and str(tmp_path) not in text  # no socket folder, no path of this machine
    assert tuned["over_budget"] == len(finished) - 4
    page = (tmp_path / "pages" / KEY / "trials.md").read_text()
    assert f"{len(finished)} finished ({len(finished) - 4} over the budget" in page and "s3cret" not in page
    assert not any("s3cret" in out for out in outs)
    assert "s3cret" not in (tmp_path / "pages" / ".tune.lock").read_text()


# ----------------------------------------------------------------------------- who writes the results
def test_a_process_that_ends_while_another_runs_a_trial_writes_nothing(tmp_path, capsys):
    from experiments import tune
    from tl.engine import trials, tuning

    study = tuning.open_study(tmp_path / "s.db", "s", {"recipe": "r", "dataset": "d", "data_fingerprint": "f"}, 0)
    trial = study.ask()
    trial.set_user_attr("process", trials.this_process())  # this process is alive: its trial runs
    to = tune.Written(tmp_path / "pages" / "r-d", tmp_path / "tuned" / "r-d.json", "python -m experiments.tune")
    assert tune.write_results(study, None, {}, to) == 0
    assert "trials 0 still run in other processes: the last process to end writes" in capsys.readouterr().out
    assert not to.pages.exists() and not to.tuned.exists()
    study.tell(trial, 0.5)
    study.set_user_attr("results_written", {"trials": 1, "by": "host h, pid 1"})
    to.pages.mkdir(parents=True)
    (to.pages / "trials.md").write_text("written by the other process\n")
    to.tuned.parent.mkdir()
    to.tuned.write_text("{}\n")
    assert tune.write_results(study, None, {}, to) == 0  # the other process wrote them for these trials
    assert "the tuned file and the pages of these 1 trials were written by host h, pid 1" in capsys.readouterr().out
    assert (to.pages / "trials.md").read_text() == "written by the other process\n"


def test_the_study_records_its_results_as_written_only_once_they_are_in_place(tmp_path, monkeypatch, capsys):
    """`results_written` (which lets a later process leave the pages as they are) is recorded after the
    update of the pages and the tuned file is done: a process killed inside that update has them
    undone by the next (tl.engine.files.finish_cut_off) and must not have claimed them."""
    import contextlib

    from experiments import tune
    from tl.engine import files, tuning

    study = tuning.open_study(tmp_path / "s.db", "s", {"recipe": "r", "dataset": "d", "data_fingerprint": "f"}, 0)
    study.tell(study.ask(), 0.5)
    events, update = [], files.updating

    @contextlib.contextmanager
    def watched(*args, **kwargs):
        with update(*args, **kwargs):
            yield
        events.append("update done")

    monkeypatch.setattr(files, "updating", watched)
    monkeypatch.setattr(study, "set_user_attr", lambda key, value: events.append(key))
    to = tune.Written(tmp_path / "pages" / "r-d", tmp_path / "tuned" / "r-d.json", "python -m experiments.tune")
    monkeypatch.setattr(tune, "write_pages", lambda *a: [to.pages / "trials.md"])
    monkeypatch.setattr(tune, "write_tuned", lambda *a: to.tuned)
    monkeypatch.setattr(tune, "train_command", lambda *a: "python main.py ...")
    search = type("Search", (), {"args": None, "data": None})
    assert tune.write_results(study, search, {}, to) == 0
    assert events == ["update done", "results_written"], events


def test_the_printed_training_command_names_the_tuned_folder_the_backbone_and_quotes_the_data(tmp_path):
    """The command tune prints at its end is one a shell runs as it reads: TL_TUNED_DIR where the
    tuned file went elsewhere, -b where a backbone was given, a data path with a | or a space quoted."""
    import shlex

    from experiments import tune

    data = tmp_path / "my data|x"
    args = tune.parse_args(["--recipe", "resnet_frozen", "--trials", "1", "--data", str(data), "--backbone", "tiny",
                            "--tuned-dir", str(tmp_path / "t d")])
    words = shlex.split(tune.train_command(args, data))
    assert words == [f"TL_TUNED_DIR={tmp_path / 't d'}", "python", "main.py", "-e", "tuned_resnet_frozen", "-b", "tiny",
                     "--data", str(data)]
    plain = tune.parse_args(["--recipe", "resnet_frozen", "--trials", "1", "--data", "d"])
    assert tune.train_command(plain, "d") == "python main.py -e tuned_resnet_frozen --data d"


@pytest.mark.parametrize("told", [(0.9, 0.9, 0.5), (0.5, 0.9, 0.9), (0.9, 0.5, 0.9, 0.9),
                                  ((1 + 1 + 0.985) / 3, (1 + 0.995 + 0.99) / 3, 0.5)])  # 597 of 600 twice
def test_of_trials_that_tie_the_lowest_number_is_kept_whatever_the_database_returns(tmp_path, monkeypatch, told):
    """Inner scores count images, so trials tie; the one kept must not hang on the database: Optuna's
    best_trial takes the first row of an ORDER BY value, whose order among equal values SQL leaves
    open (SQLite happens to give the lowest number; a PostgreSQL server need not)."""
    from experiments import tune
    from tl.engine import tuning

    study = tuning.open_study(tmp_path / "s.db", "s", {"recipe": "r", "dataset": "d", "data_fingerprint": "f"}, 0)
    trials = [study.ask() for _ in told]
    for trial, value in reversed(list(zip(trials, told))):  # the last asked ends first, as in a shared search
        study.tell(trial, value)
    top = [n for n, v in enumerate(told) if round(v, 9) == round(max(told), 9)]
    last_tied = study.trials[top[-1]]
    monkeypatch.setattr(study._storage, "get_best_trial", lambda study_id: last_tied)  # another database's order
    best, tied = tune.chosen(study)
    assert (best.number, tied) == (top[0], top[1:])
    assert tune.tie_text([]) == ""
    assert "Trial 2 ties with it" in tune.tie_text([2]) and "Trials 2, 3 tie with it" in tune.tie_text([2, 3])
