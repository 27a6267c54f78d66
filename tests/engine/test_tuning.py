"""tl/engine/tuning.py: the study file (a path taken as it is, a heartbeat that retries a killed
trial) and the search space, which follows the recipe's groups and fields."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_a_storage_path_with_a_question_mark_is_that_file(tmp_path):
    from tl.engine.tuning import make_storage

    make_storage(tmp_path / "a?b#c.db")
    assert [p.name for p in tmp_path.iterdir()] == ["a?b#c.db"]


@pytest.mark.usefixtures("own_cache_dir")
def test_the_study_file_beats_and_retries_a_killed_trial(tmp_path):
    import optuna

    from tl.engine import tuning

    storage = tuning.make_storage(tmp_path / "s.db")
    assert (storage.heartbeat_interval, storage.grace_period) == (tuning.HEARTBEAT_S, tuning.GRACE_S) == (60, 180)
    callback = storage.heartbeat_stale_trial_callback
    assert isinstance(callback, optuna.storages.RetryHeartbeatStaleTrialCallback) and callback._max_retry == 2


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
