"""Bad input for issue 23's features (a review's findings): each test builds its input and checks
the outcome, correct work or one `error:` line with exit status 2, never a traceback."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path

import pytest
import torch
from torch import nn

import main
from tests.conftest import TinyNet
from tl.engine import files
from tl.models import BACKBONES, Backbone


def cli(capsys, *argv) -> tuple[int, str, str]:
    """main.main(argv) -> (exit status, stdout, stderr); never a traceback."""
    code = main.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


class WideKernelNet(TinyNet):
    """TinyNet whose first layer is a 20-pixel kernel without padding: it cannot take 16-pixel images."""

    def __init__(self):
        super().__init__()
        self.stem[0] = nn.Conv2d(3, 8, 20)


@pytest.fixture
def wide_kernel(monkeypatch) -> str:
    monkeypatch.setitem(BACKBONES, "wide", Backbone("wide", WideKernelNet, head="fc", neck=("block",)))
    return "wide"


def test_an_image_size_too_small_for_the_backbone_is_refused_before_training(tiny_data, wide_kernel, tmp_path,
                                                                            capsys):
    code, out, err = cli(capsys, "-e", "resnet_frozen", "--data", tiny_data, "-b", wide_kernel, "--weights", "none",
                         "--quick", "--image-size", 16, "--out", tmp_path / "runs", "--no-progress")
    assert code == 2 and err.startswith("error: wide cannot take 16-pixel images"), err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# ----------------------------------------------------------------------------- a last.ckpt whose "ema" was edited
def _run_with_ema(capsys, data, backbone, out) -> Path:
    code, _, err = cli(capsys, "-e", "resnet_scratch", "--data", data, "-b", backbone, "--weights", "none",
                       "--quick", "--image-size", 32, "--ema", 0.9, "--out", out, "--no-progress")
    assert code == 0, err
    (run,) = out.iterdir()
    return run


def _edit(ckpt_path: Path, change) -> None:
    """Change a last.ckpt by hand, the digest recomputed: only the content checks can tell."""
    ckpt = torch.load(ckpt_path, weights_only=False)
    ckpt.pop("digest")
    change(ckpt)
    ckpt["digest"] = files.state_digest(ckpt)
    torch.save(ckpt, ckpt_path)


@pytest.mark.parametrize("change, says", [
    (lambda c: c.update(ema="garbage"), 'average of the weights ("ema") is not the state of an average'),
    (lambda c: c["ema"].pop("n_averaged"), "average of the weights does not fit its model"),
    (lambda c: c["ema"].update(n_averaged=torch.zeros(3)), "average of the weights does not fit its model"),
    (lambda c: c.update(ema=None), "holds no average of the weights"),
])
def test_a_hand_edited_average_in_last_ckpt_is_refused(tiny_data, tiny_backbone, tmp_path, capsys, change, says):
    run = _run_with_ema(capsys, tiny_data, tiny_backbone, tmp_path / "runs")
    _edit(run / "last.ckpt", change)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    code, _, err = cli(capsys, "--resume", run / "last.ckpt", "--epochs", 2, "--no-progress")
    assert code == 2 and says in err and err.startswith("error:"), err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # nothing written, nothing lost
    if "not the state" in says:  # --evaluate reads the average too
        code, _, err = cli(capsys, "--evaluate", run / "last.ckpt", "--data", tiny_data)
        assert code == 2 and says in err, err


def test_an_average_added_by_hand_to_a_run_without_one_is_refused(tiny_data, tiny_backbone, tmp_path, capsys):
    donor = _run_with_ema(capsys, tiny_data, tiny_backbone, tmp_path / "donor")
    code, _, err = cli(capsys, "-e", "resnet_scratch", "--data", tiny_data, "-b", tiny_backbone, "--weights", "none",
                       "--quick", "--image-size", 32, "--out", tmp_path / "runs", "--no-progress")
    (run,) = (tmp_path / "runs").iterdir()
    ema = torch.load(donor / "last.ckpt", weights_only=False)["ema"]
    _edit(run / "last.ckpt", lambda c: c.update(ema=ema))
    code, _, err = cli(capsys, "--resume", run / "last.ckpt", "--epochs", 2, "--no-progress")
    assert code == 2 and "though its run asks for none" in err, err


# ----------------------------------------------------------------------------- a search's --storage
def _tune(tmp_path: Path, data: Path, backbone: str, storage: Path, *extra) -> int:
    from experiments import tune

    return tune.main([str(a) for a in ("--recipe", "modern_finetune", "--data", data, "--backbone", backbone,
                                       "--weights", "none", "--quick", "--out", tmp_path / "pages", "--tuned-dir",
                                       tmp_path / "tuned", "--runs-dir", tmp_path / "trials", "--storage", storage,
                                       *extra)])


def _foreign_sqlite(path: Path) -> Path:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE studies (x INTEGER)")
        db.commit()
    return path


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
    assert _tune(tmp_path, tiny_data, tiny_backbone, storage, "--trials", 1) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --storage") and says in err and "Traceback" not in err, err
    assert {p: p.read_bytes() for p in tmp_path.rglob("store.db*") if p.is_file()} == before
    assert not (tmp_path / "trials").exists()


def test_a_storage_path_with_a_question_mark_is_that_file(tmp_path):
    from tl.engine.tuning import make_storage

    make_storage(tmp_path / "a?b#c.db")
    assert [p.name for p in tmp_path.iterdir()] == ["a?b#c.db"]


# ----------------------------------------------------------------------------- a tuned file edited by hand
@pytest.mark.parametrize("fields, says", [
    ({"augment": "bogus"}, 'recipe_fields.augment = "bogus" is none of'),
    ({"train_epochs": "3"}, "is not a whole number >= 1"),
    ({"train_epochs": 2.5}, "is not a whole number >= 1"),
    ({"batch_size": 0}, "is not a whole number >= 1"),
    ({"lrs": {"head": "fast"}}, "is not a table of positive learning rates"),
    ({"lrs": [1e-3]}, "is not a table of positive learning rates"),
    ({"label_smoothing": 2.0}, "is not a label smoothing"),
    ({"weight_decay": -1.0}, "is not a weight decay"),
    ({"ema_decay": 1.5}, "is not a decay in (0, 1)"),
    ({"tta": "yes"}, "is not true or false"),
    ({"loss": "mse"}, "is none of cross_entropy, bce_logit"),
    ({"bogus_field": 1}, "is not a field a tuned file may set"),
    ({"name": "x"}, "is not a field a tuned file may set"),
    ({"stack_head": True}, "is not a field a tuned file may set"),  # the recipe's build is written for its own head
    ({"first_lrs": None}, "for the recipe's groups (head)"),  # a staged recipe needs its first stage's rates
    ({"lrs": {"head": 1e-3}}, "is not a table of positive learning rates for the recipe's groups (body, neck, head)"),
    ({"lrs": {"all": 1e-3}}, "for the recipe's groups (body, neck, head)"),
    ({"first_lrs": {"head": 1e-3, "body": 1e-4}}, "for the recipe's groups (head)"),
])
def test_a_tuned_file_with_a_field_outside_the_recipe_is_refused(tiny_data, tiny_backbone, tmp_path, monkeypatch,
                                                                 capsys, fields, says):
    monkeypatch.setenv("TL_TUNED_DIR", str(tmp_path / "tuned"))
    (tmp_path / "tuned").mkdir()
    tuned = {"recipe": "modern_finetune", "dataset": tiny_data.name, "params": {},
             "recipe_fields": {"train_epochs": 2, "augment": "strong", "tta": True} | fields}
    (tmp_path / "tuned" / f"modern_finetune-{tiny_data.name}.json").write_text(json.dumps(tuned))
    code, _, err = cli(capsys, "-e", "tuned_modern_finetune", "--data", tiny_data, "-b", tiny_backbone, "--weights",
                       "none", "--quick", "--epochs", 2, "--image-size", 32, "--out", tmp_path / "runs",
                       "--no-progress")  # two epochs: the second stage builds its optimizer
    assert code == 2 and err.startswith("error: ") and says in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()
    if fields == {"augment": "bogus"}:  # the valid fields alone: a recipe that trains
        tuned["recipe_fields"].pop("augment")
        (tmp_path / "tuned" / f"modern_finetune-{tiny_data.name}.json").write_text(json.dumps(tuned))
        code, out, err = cli(capsys, "-e", "tuned_modern_finetune", "--data", tiny_data, "-b", tiny_backbone,
                             "--weights", "none", "--quick", "--image-size", 32, "--out", tmp_path / "runs",
                             "--no-progress")
        assert code == 0 and "mirror averaged" in out, err


def test_which_recipe_commands_name_the_backbone_of_the_row_they_answer_with():
    """The README's answer names the most accurate row (a recipe on a backbone); its command
    must train that row, not the same recipe's first row on another backbone."""
    import pandas as pd

    from experiments.report import which_recipe

    ROOT = Path(__file__).resolve().parents[1]
    summary = pd.read_csv(ROOT / "results" / "summary.csv")
    diffs = pd.read_csv(ROOT / "results" / "differences.csv")
    hym = summary[(summary.dataset == "hymenoptera_data") & (summary.status == "ok")]
    best = hym.loc[hym.headline_acc_mean.idxmax()]
    text = which_recipe(summary, diffs)
    assert f"`{best.experiment}` ({best.backbone})" in text
    assert f"python main.py -e {best.experiment} -b {best.backbone}" in text


def test_which_recipe_adds_epochs_only_to_a_row_trained_shorter_than_its_recipe():
    """A command in the README must retrain the row it answers with: `--epochs N` appears only when
    the row's epochs differ from the recipe's own, and only then does the text say it was shortened."""
    import pandas as pd

    from experiments import get_experiment
    from experiments.report import which_recipe

    own = get_experiment("modern_finetune").RECIPE.train_epochs

    def summary(epochs):
        return pd.DataFrame([dict(dataset="dogs-vs-cats", status="ok", experiment="modern_finetune",
                                  backbone="efficientnet_lite0", headline="test, epoch chosen on val",
                                  headline_acc_mean=0.99, headline_acc_std=0.004, train_epochs=epochs,
                                  train_images_per_s_mean=30.0, train_seconds_mean=500.0)])

    diffs = pd.DataFrame(columns=["dataset", "verdict", "a", "b"])
    full = which_recipe(summary(own), diffs)
    assert "--epochs" not in full and "other than the recipe's own" not in full
    assert f"{own} training epochs" in full
    short = which_recipe(summary(1), diffs)
    assert "--data data/dogs-vs-cats --epochs 1" in short
    assert "dogs-vs-cats run with `--epochs` other than the recipe's own" in short
    assert "1 training epoch at" in short


def test_provenance_says_which_rows_of_a_command_a_later_command_replaced():
    """results/README lists every command; a row rerun by a later command (same recipe and backbone)
    must not read as if the earlier, shorter command still made it."""
    from experiments.report import provenance

    first = dict(command="compare_all --epochs 2", experiments=["tutorial_finetune", "tutorial_frozen"],
                 backbones=["efficientnet_lite0", "own"])
    second = dict(command="compare_all", experiments=["tutorial_frozen"], backbones=["efficientnet_lite0"])
    lines = provenance({"datasets": {"dogs-vs-cats": {"data": "d", "commands": [first, second]}}})
    earlier = next(line for line in lines if "--epochs 2" in line)
    assert "since rerun by a later command: tutorial_frozen / efficientnet_lite0)" in earlier
    assert "tutorial_finetune /" not in earlier and "tutorial_frozen / own" not in earlier
    assert "since rerun" not in next(line for line in lines if "`compare_all`" in line)


def test_a_recipe_paragraph_says_when_its_row_trained_fewer_epochs_than_the_recipe():
    """The recipe's note describes its own schedule ("every 7 of 25 epochs"); a shortened row must
    say so beside it, and a full row must not."""
    import pandas as pd

    from experiments.report import paragraph

    row = pd.Series(dict(experiment="tutorial_finetune", backbone="efficientnet_lite0", dataset="d", source="s",
                         status="ok", train_epochs=2, headline="val", headline_acc_mean=0.9, headline_acc_std=0.01,
                         seeds=3, baseline_val_acc_mean=0.5, best_val_acc_mean=0.9, best_val_acc_std=0.01,
                         best_epoch_mean=2.0, trainable_params=10, total_params=20, train_seconds_mean=5.0,
                         train_images_per_s_mean=9.0))
    empty = pd.DataFrame(columns=["dataset", "experiment", "backbone", "status"])
    assert "This row ran 2 training epochs (`--epochs 2`), not the recipe's 25." in paragraph(row, empty)
    assert "This row ran" not in paragraph(row.copy().replace({2: 25}), empty)
