"""Tuning without peeking (experiments/tune.py): the inner split carved from train, a search
that never reads val/ or test/, its study file (continued, refused when it belongs to another
recipe or data set) and what it writes: the tuned numbers, the pages, the `tuned_<recipe>` recipe."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import write_image_folder
from tl import TLError
from tl.data import build_transforms
from tl.engine import run_folder
from tl.engine.selection import ImageChoice, inner_split, select_images

pytestmark = pytest.mark.usefixtures("own_cache_dir")
TRANSFORMS = build_transforms((0.5,) * 3, (0.5,) * 3, size=16, augment=False)


def _choice(data: Path, **kw) -> ImageChoice:
    return ImageChoice(data, **kw)


_WATCHED: list[Path] = []  # folders whose listing or opening is recorded in _SEEN
_SEEN: list[str] = []


def _audit(event: str, args: tuple) -> None:
    """Every listing (os.scandir, os.listdir: os.walk, glob and Path.iterdir use them) and every
    open() of a path inside a watched folder. Without the file names a listing gives, no image
    of the folder can be decoded either. (An audit hook stays for the process: it only records.)"""
    if _WATCHED and event in ("open", "os.scandir", "os.listdir") and args and isinstance(args[0], (str, Path)):
        path = os.path.abspath(args[0])
        if any(path == str(w) or path.startswith(str(w) + os.sep) for w in _WATCHED):
            _SEEN.append(f"{event} {path}")


sys.addaudithook(_audit)


@pytest.fixture
def sealed(tmp_path):
    """train/: 10 + 7 images per class; val/ and test/ exist, and any listing or opening of
    them (or of anything inside) is recorded: the test then asserts nothing was."""
    root = write_image_folder(tmp_path / "sealed", train=10, val=3, size=16, phases=("train", "val", "test"))
    for f in sorted((root / "train" / "class_1").glob("*.png"))[:3]:  # an unequal second class
        f.unlink()
    _SEEN.clear()
    _WATCHED[:] = [(root / "val").resolve(), (root / "test").resolve()]
    yield root
    _WATCHED.clear()
    assert not _SEEN, f"val/ or test/ was read: {_SEEN[:3]}"


def test_the_inner_split_is_seeded_class_balanced_and_disjoint(sealed):
    sets = select_images(_choice(sealed, inner_val=0.3), TRANSFORMS, log=lambda s: None)
    assert set(sets) == {"train", "val"}
    train, val = sets["train"].samples, sets["val"].samples
    assert not set(train) & set(val)
    assert all(Path(p).parent.parent == sealed / "train" for p, _ in train + val)  # all from train/
    assert Counter(t for _, t in val) == {0: 3, 1: 2}  # round(0.3 * 10), round(0.3 * 7)
    assert len(train) + len(val) == 17
    again = select_images(_choice(sealed, inner_val=0.3), TRANSFORMS, log=lambda s: None)
    assert again["val"].samples == val  # seeded
    other = select_images(_choice(sealed, inner_val=0.3, split_seed=1), TRANSFORMS, log=lambda s: None)
    assert other["val"].samples != val
    assert sets["val"].transform is TRANSFORMS["val"] and sets["train"].transform is TRANSFORMS["train"]


def test_k_folds_score_every_training_image_once(sealed):
    vals = [select_images(_choice(sealed, folds=3, inner_fold=k), TRANSFORMS, log=lambda s: None)["val"].samples
            for k in range(3)]
    flat = [s for v in vals for s in v]
    assert len(flat) == len(set(flat)) == 17
    assert all(Counter(t for _, t in v)[0] >= 3 and Counter(t for _, t in v)[1] >= 2 for v in vals)


def test_an_inner_run_is_not_mistaken_for_a_real_one(tmp_path):
    """Its data fingerprint differs from the real run's (resume refuses to mix them) and its
    feature cache entries are keyed by the files they hold (tl/engine/feature_store.cache_key)."""
    root = write_image_folder(tmp_path / "d", train=6, val=6, size=16)
    real = select_images(_choice(root), TRANSFORMS, log=lambda s: None)
    inner = select_images(_choice(root, inner_val=0.5), TRANSFORMS, log=lambda s: None)
    assert run_folder.data_fingerprint(real) != run_folder.data_fingerprint(inner)


@pytest.mark.parametrize("kw, words", [({"inner_val": 0.2}, "at least 2"), ({"folds": 3}, "at least --folds 3"),
                                       ({"inner_val": 1.0}, "between 0 and 1"), ({"folds": 1}, "at least 2")])
def test_too_small_a_class_or_a_bad_fraction_is_refused(tmp_path, kw, words):
    root = write_image_folder(tmp_path / "d", train=1, val=2, size=16)
    with pytest.raises(TLError, match=words):
        select_images(_choice(root, **kw), TRANSFORMS, log=lambda s: None)


def test_inner_split_alone():
    samples = [(f"/d/a/{i}.png", 0) for i in range(10)] + [(f"/d/b/{i}.png", 1) for i in range(4)]
    train, val = inner_split(samples, ["a", "b"], fraction=0.2)
    assert Counter(t for _, t in val) == {0: 2, 1: 1} and len(train) == 11


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


def test_the_study_file_beats_and_retries_a_killed_trial(tmp_path):
    import optuna

    from tl.engine import tuning

    storage = tuning.make_storage(tmp_path / "s.db")
    assert (storage.heartbeat_interval, storage.grace_period) == (tuning.HEARTBEAT_S, tuning.GRACE_S) == (60, 180)
    callback = storage.heartbeat_stale_trial_callback
    assert isinstance(callback, optuna.storages.RetryHeartbeatStaleTrialCallback) and callback._max_retry == 2


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
def test_compare_all_adds_a_tuned_recipe_where_its_data_set_has_one(tmp_path, monkeypatch):
    from experiments import compare_all

    monkeypatch.setenv("TL_TUNED_DIR", str(tmp_path))
    (tmp_path / "modern_finetune-hymenoptera_data.json").write_text("{}")
    args = compare_all.parse_args([])
    assert compare_all.experiments_for(Path("x/hymenoptera_data"), args)[-1] == "tuned_modern_finetune"
    assert "tuned_modern_finetune" not in compare_all.experiments_for(Path("x/dogs-vs-cats"), args)
    asked = compare_all.parse_args(["--experiments", "resnet_frozen", "tuned_modern_finetune"])
    assert compare_all.experiments_for(Path("x/hymenoptera_data"), asked) == ["resnet_frozen", "tuned_modern_finetune"]
    assert compare_all._order("tuned_modern_finetune") > compare_all._order("modern_finetune")
