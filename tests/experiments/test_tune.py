"""Tuning without peeking (experiments/tune.py): the inner split carved from train, a search
that never reads val/ or test/, its study file (continued, refused when it belongs to another
recipe or data set) and what it writes: the tuned numbers, the pages, the `tuned_<recipe>` recipe."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import _SEEN, _WATCHED, write_image_folder

pytestmark = pytest.mark.usefixtures("own_cache_dir")


# ----------------------------------------------------------------------------- the search
def _tune(tmp_path: Path, data: Path, weights: Path, *extra: str) -> int:
    from experiments import tune

    return tune.main(["--recipe", "modern_finetune", "--data", str(data), "--backbone", "tiny", "--weights",
                      str(weights), "--quick", "--out", str(tmp_path / "pages"), "--tuned-dir", str(tmp_path / "tuned"),
                      "--runs-dir", str(tmp_path / "trials"), "--storage", str(tmp_path / "study.db"), *extra])


def _study(tmp_path: Path):
    import optuna

    return optuna.load_study(study_name=None, storage=f"sqlite:///{tmp_path / 'study.db'}")


def test_a_search_reads_no_val_or_test_image_and_its_recipe_trains(sealed, pretrained, tmp_path, monkeypatch, capsys):
    import main
    from experiments import get_experiment

    assert _tune(tmp_path, sealed, pretrained, "--trials", "2") == 0
    assert not _SEEN, f"the search read val/ or test/: {_SEEN[:3]}"
    _WATCHED.clear()  # from here on, the tuned recipe trains and is scored like any other
    tuned = json.loads((tmp_path / "tuned" / "modern_finetune-sealed.json").read_text())
    assert tuned["trials"] == {"budget": 2, "complete": 2, "pruned": 0, "fail": 0}
    assert tuned["inner_split"] == {"inner_val": 0.2, "folds": None, "seed": 0} and tuned["backbone"] == "tiny"
    assert 0 <= tuned["best_inner_score"] <= 1 and tuned["command"].startswith("python -m experiments.tune --recipe")
    assert set(tuned["params"]) == {"lr_scale", "body_factor", "weight_decay", "train_epochs", "label_smoothing",
                                    "augment", "bn_policy", "ema_decay", "tta"}
    pages = tmp_path / "pages" / "modern_finetune-sealed"
    assert {p.name for p in pages.iterdir()} == {"trials.md", "trials.csv", "history.png", "importance.png"}
    table = (pages / "trials.csv").read_text().splitlines()
    assert len(table) == 3 and table[0].startswith("number,state,inner_score,last_epoch,duration_s,cpu_s,param ")
    assert "Budget: 2 finished trials" in (pages / "trials.md").read_text()
    assert not list((tmp_path / "trials").rglob("*.pth"))  # trial runs keep their records, not their weights
    configs = [json.loads(p.read_text()) for p in (tmp_path / "trials").rglob("config.json")]
    assert len(configs) == 2 and all(c["options"]["inner_val"] == 0.2 for c in configs)

    monkeypatch.setenv("TL_TUNED_DIR", str(tmp_path / "tuned"))
    recipe = get_experiment("tuned_modern_finetune", sealed).RECIPE
    assert recipe.name == "tuned_modern_finetune" and "modern_finetune-sealed.json" in recipe.source
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
    tuned = json.loads((tmp_path / "tuned" / "modern_finetune-tiny.json").read_text())
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
    assert (tmp_path / "pages" / "modern_finetune-tiny" / "importance.png").is_file()


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


@pytest.mark.parametrize("argv, words", [(["--trials", "0"], "--trials must be at least 1"),
                                         (["--trials", "1", "--inner-val", "1.5"], "--inner-val must be between 0"),
                                         (["--trials", "1", "--inner-val", "0"], "--inner-val must be between 0"),
                                         (["--trials", "1", "--folds", "1"], "--folds must be at least 2")])
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


