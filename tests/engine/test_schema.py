"""tl/engine/schema.py: every file a person may edit and the project reads back (a tuned file, a
run's config.json, the options saved in last.ckpt, an exported model's description) is checked
against one declared schema. Each field out of its bounds (a huge epoch count, a batch of 0 or
less, a rate of 1e9, a string where a number belongs, a field missing) is one `error:` line naming
the file, the field, the value and the bound; nothing starts. The kind is tried with several
instances per file, and several at once (one line each)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import main
from experiments import NAMES, get_experiment
from tl.data import AUGMENT_POLICIES, val_resize
from tl.engine import export, schema
from tl.engine.model_loading import context_for
from tl.engine.options import RunOptions, resolve
from tl.engine.resume import resume_options
from tl.engine.schema import CONFIG, OPTIONS, RECIPE, SchemaError
from tl.engine.tuning import tuned_recipe
from tl.recipe import Recipe

ROOT = Path(__file__).resolve().parents[2]

# (a change, the field and the words its one line must hold: the value and the bound)
RECIPE_EDITS = [
    ({"train_epochs": 10**9}, "train_epochs = 1000000000 is not a whole number >= 1 and <= 10000"),
    ({"train_epochs": "3"}, 'train_epochs is str "3", which is not a whole number >= 1 and <= 10000'),
    ({"batch_size": 0}, "batch_size = 0 is not a whole number >= 1 and <= 65536"),
    ({"batch_size": -32}, "batch_size = -32 is not a whole number >= 1"),
    ({"label_smoothing": "0.1"}, 'label_smoothing is str "0.1", which is not a label smoothing >= 0 and < 1'),
    ({"weight_decay": 1e9}, "weight_decay = 1000000000.0 is not a weight decay >= 0 and <= 1"),
    ({"ema_decay": 1.0}, "ema_decay = 1.0 is not a decay in (0, 1) (or 0: off)"),
    ({"augment": 7}, "augment is int 7, which is not one of standard, tutorial, strong"),
]
OPTION_EDITS = [
    ({"epochs": 10**9}, "options.epochs = 1000000000 is not a whole number >= 1 and <= 10000"),
    ({"batch_size": 0}, "options.batch_size = 0 is not a whole number >= 1 and <= 65536"),
    ({"batch_size": -1}, "options.batch_size = -1 is not a whole number >= 1"),
    ({"image_size": 10**6}, "options.image_size = 1000000 is not a whole number >= 8 and <= 4096, or null"),
    ({"image_size": "224"}, 'options.image_size is str "224", which is not a whole number >= 8'),
    ({"train_per_class": "3"}, 'options.train_per_class is str "3", which is not a whole number >= 1'),
    ({"lr_scale": 0}, "options.lr_scale = 0 is not a number > 0"),
    ({"lr_scale": "2"}, 'options.lr_scale is str "2", which is not a number > 0'),
    ({"seed": -1}, "options.seed = -1 is not a whole number >= 0 and <= 4294967295"),
    ({"val_split": 1.5}, "options.val_split = 1.5 is not a number > 0 and < 1, or null"),
]


def _lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


# ----------------------------------------------------------------------------- the declaration itself
def test_the_schema_declares_every_recipe_field_and_option_and_accepts_every_recipe():
    assert set(RECIPE) == {f.name for f in dataclasses.fields(Recipe)}
    assert set(OPTIONS) == {f.name for f in dataclasses.fields(RunOptions)}
    assert RECIPE["augment"].choices == AUGMENT_POLICIES  # one list of augmentations, in tl/data.py's order
    defaults = RunOptions(data=Path("data"))
    for name in NAMES:  # every recipe is within a tuned file's bounds, and the config.json of its run reads back
        recipe = dataclasses.asdict(resolve(get_experiment(name).RECIPE, defaults))
        saved = json.loads(json.dumps({"recipe": recipe, "options": dataclasses.asdict(defaults)}, default=str))
        assert schema.problems(recipe, RECIPE, rules=schema.TUNED_RULES) == []
        assert schema.problems(saved, {k: CONFIG[k] for k in ("recipe", "options")}) == []
    for path in sorted((ROOT / "experiments" / "tuned").glob("*.json")):  # and so is every committed tuned file
        tuned_recipe(get_experiment(json.loads(path.read_text())["recipe"]).RECIPE, path)


def test_several_violations_are_one_line_each():
    with pytest.raises(SchemaError) as caught:
        schema.check({"a": 0, "b": "x"}, {"a": schema.Field("whole", 1, 9), "b": schema.Field("number"),
                                          "c": schema.Field("bool", required=True)}, "f.json: ")
    assert caught.value.lines == ["f.json: a = 0 is not a whole number >= 1 and <= 9",
                                  'f.json: b is str "x", which is not a number',
                                  "f.json: c is missing (it must be true or false)"]
    assert str(caught.value).split("\nerror: ") == caught.value.lines  # printed after "error: ", one line each


# ----------------------------------------------------------------------------- tuned files
def _tuned_file(tmp_path: Path, data: Path, change) -> Path:
    """The committed hymenoptera tuned file, for `data`'s name and the tiny backbone, after `change`."""
    committed = ROOT / "experiments" / "tuned" / "modern_finetune-hymenoptera_data-efficientnet_lite0.json"
    tuned = json.loads(committed.read_text()) | {"dataset": data.name, "backbone": "tiny"}
    tuned["recipe_fields"]["backbone"] = "tiny"
    (tmp_path / "tuned").mkdir(exist_ok=True)
    path = tmp_path / "tuned" / f"modern_finetune-{data.name}-tiny.json"
    path.write_text(json.dumps(change(tuned)))
    return path


@pytest.mark.parametrize("fields, says", RECIPE_EDITS + [
    ({"lrs": {"body": 1e9, "neck": 1e-3, "head": 1e-2}},
     'lrs = {"body": 1000000000.0, "neck": 0.001, "head": 0.01} is not a table of positive learning rates (each <= 1'),
    ({"lrs": {"body": -1e-3, "neck": 1e-3, "head": 1e-2}},
     'lrs = {"body": -0.001, "neck": 0.001, "head": 0.01} is not a table of positive learning rates'),
    ({"lrs": {"body": "1e-3", "neck": 1e-3, "head": 1e-2}},
     'lrs = {"body": "1e-3", "neck": 0.001, "head": 0.01} is not a table of positive learning rates'),
    ({"lrs": {"body": 1e-4, "neck": 1e-3, "head": 5}},
     'lrs = {"body": 0.0001, "neck": 0.001, "head": 5} is not a table of positive learning rates (each <= 1)'),
    ({"first_lrs": {"head": 1.5}}, 'first_lrs = {"head": 1.5} is not a table of positive learning rates (each <= 1)')])
def test_a_tuned_file_out_of_bounds_is_one_line_and_nothing_trains(tmp_path, tiny_data, tiny_backbone, monkeypatch,
                                                                   capsys, fields, says):
    monkeypatch.setenv("TL_TUNED_DIR", str(tmp_path / "tuned"))
    path = _tuned_file(tmp_path, tiny_data, lambda t: t | {"recipe_fields": t["recipe_fields"] | fields})
    code = main.main(["-e", "tuned_modern_finetune", "--data", str(tiny_data), "-b", tiny_backbone, "--weights", "none",
                      "--image-size", "32", "--out", str(tmp_path / "runs"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and len(_lines(err)) == 1, err
    assert err.startswith(f"error: {path}: recipe_fields.{says}") and "run python -m experiments.tune again" in err, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("text", ['{"a":' * 100_000 + "1" + "}" * 100_000, "[" * 50_000 + "]" * 50_000])
def test_a_tuned_file_nested_too_deeply_is_one_error_not_a_traceback(tmp_path, text):
    """schema.loads, the reader of every hand-edited JSON file: nesting past Python's parser is a
    ValueError, which each reader turns into its one error line."""
    from tl import TLError
    from tl.engine.schema import loads

    with pytest.raises(ValueError, match="nested too deeply"):
        loads(text)
    path = tmp_path / "modern_finetune-d-tiny.json"
    path.write_text(text)
    with pytest.raises(TLError, match="is not a tuned file"):
        tuned_recipe(get_experiment("modern_finetune").RECIPE, path)


@pytest.mark.parametrize("key", ["recipe_fields", "params", "recipe", "dataset", "backbone"])
def test_a_tuned_file_without_a_required_field_is_refused(tmp_path, tiny_data, key):
    path = _tuned_file(tmp_path, tiny_data, lambda t: {k: v for k, v in t.items() if k != key})
    with pytest.raises(SchemaError, match=f"{path}: {key} is missing"):
        tuned_recipe(get_experiment("modern_finetune").RECIPE, path)


def test_every_violation_of_a_tuned_file_is_its_own_line(tmp_path, tiny_data):
    edits = {k: v for change, _ in RECIPE_EDITS[::2] for k, v in change.items()}
    path = _tuned_file(tmp_path, tiny_data, lambda t: t | {"recipe_fields": t["recipe_fields"] | edits})
    with pytest.raises(SchemaError) as caught:
        tuned_recipe(get_experiment("modern_finetune").RECIPE, path)
    assert len(caught.value.lines) == len(edits)
    for (_, says), line in zip(RECIPE_EDITS[::2], caught.value.lines):
        assert line.startswith(f"{path}: recipe_fields.{says}"), line


# modern_finetune: 12 epochs, the first 1 of them its head-only stage at first_lrs, cross entropy
@pytest.mark.parametrize("fields, says", [
    ({"first_epochs": 7}, "recipe_fields.first_epochs = 7 and recipe_fields.train_epochs = 7 do not fit: "
                          "first_epochs (the first stage) must be fewer than train_epochs"),
    ({"first_epochs": 5, "train_epochs": 3}, "recipe_fields.first_epochs = 5 and recipe_fields.train_epochs = 3 do "
                                              "not fit"),
    ({"train_epochs": 1}, "recipe_fields.first_epochs = 1 (the recipe's) and recipe_fields.train_epochs = 1 do not "
                          "fit"),
    ({"first_epochs": 0}, "recipe_fields.first_epochs = 0 and recipe_fields.first_lrs = {\"head\": 0.0037"),
    ({"first_epochs": 0, "first_lrs": None}, "recipe_fields.first_lrs = null is not a table of positive"),
    ({"loss": "bce_logit", "label_smoothing": 0.1}, "recipe_fields.loss = \"bce_logit\" and "
                                                     "recipe_fields.label_smoothing = 0.1 do not fit: label smoothing"),
    ({"loss": "bce_logit"}, "recipe_fields.loss = \"bce_logit\" and recipe_fields.label_smoothing = 0.0695"),
    ({"loss": "bce_logit", "label_smoothing": 0.0}, None),  # fits: no smoothing
])
def test_a_tuned_file_whose_fields_do_not_fit_one_another_is_one_line(tmp_path, tiny_data, fields, says):
    """Fields each within bounds but not with one another (a first stage as long as the whole run,
    smoothing a loss that ignores it), the recipe's own value counted where the file leaves one out."""
    path = _tuned_file(tmp_path, tiny_data, lambda t: t | {"recipe_fields": t["recipe_fields"] | fields})
    if says is None:
        assert tuned_recipe(get_experiment("modern_finetune").RECIPE, path).loss == fields["loss"]
        return
    with pytest.raises(SchemaError) as caught:
        tuned_recipe(get_experiment("modern_finetune").RECIPE, path)
    assert len(caught.value.lines) == 1 and caught.value.lines[0].startswith(f"{path}: {says}"), caught.value.lines
    fits = _tuned_file(tmp_path, tiny_data, lambda t: t | {"recipe_fields": t["recipe_fields"] | {
        "first_epochs": 2, "train_epochs": 3}})
    assert tuned_recipe(get_experiment("modern_finetune").RECIPE, fits).first_epochs == 2


# ----------------------------------------------------------------------------- config.json
SAMPLE = {"recipe": {"backbone": "tiny", "lrs": {"all": 1e-3}, "train_epochs": 3, "batch_size": 4,
                     "loss": "cross_entropy"},
          "options": {"data": "somewhere", "epochs": 3, "batch_size": 4, "image_size": 32, "seed": 0},
          "classes": ["class_0", "class_1"], "checksums": {"best.pth": "0" * 64}}


def _config(folder: Path, change) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(change(json.loads(json.dumps(SAMPLE)))))
    (folder / "best.pth").write_bytes(b"")  # never read: the config is refused first
    return folder / "config.json"


@pytest.mark.parametrize("change, says", [
    *[((lambda c, e=e: c | {"options": c["options"] | e}), says) for e, says in OPTION_EDITS],
    *[((lambda c, e=e: c | {"recipe": c["recipe"] | e}), f"recipe.{says}") for e, says in RECIPE_EDITS],
    (lambda c: c | {"recipe": c["recipe"] | {"lrs": {"all": -1.0}}}, 'recipe.lrs = {"all": -1.0} is not a table of '
                                                                    "positive learning rates"),
    (lambda c: {k: v for k, v in c.items() if k != "classes"}, "classes is missing (it must be a list of 2 or more"),
    (lambda c: {k: v for k, v in c.items() if k != "options"}, "options is missing (it must be an object)"),
    (lambda c: c | {"recipe": {}}, "recipe.backbone is missing (it must be a text)"),
    (lambda c: c | {"classes": "class_0,class_1"}, 'classes is str "class_0,class_1", which is not a list'),
    (lambda c: c | {"checksums": {"best.pth": 7}}, "checksums = {\"best.pth\": 7} is not an object of file names"),
    (lambda c: c | {"classes": ["class_0"]}, 'classes = ["class_0"] is not a list of 2 or more distinct names'),
    (lambda c: c | {"recipe": c["recipe"] | {"first_epochs": 2, "first_lrs": None}},
     "recipe.first_epochs = 2 and recipe.first_lrs = null do not fit: a staged recipe has"),
    (lambda c: c | {"recipe": c["recipe"] | {"first_epochs": 0, "first_lrs": {"all": 1e-3}}},
     'recipe.first_epochs = 0 and recipe.first_lrs = {"all": 0.001} do not fit'),
    (lambda c: c | {"recipe": c["recipe"] | {"loss": "bce_logit", "label_smoothing": 0.2}},
     'recipe.loss = "bce_logit" and recipe.label_smoothing = 0.2 do not fit: label smoothing applies to'),
    (lambda c: c | {"options": c["options"] | {"folds": 3, "inner_fold": 3}},
     "options.folds = 3 and options.inner_fold = 3 do not fit: inner_fold must be below folds"),
])
def test_a_config_out_of_bounds_is_one_line_for_evaluate_and_predict(tmp_path, tiny_data, capsys, change, says):
    config = _config(tmp_path / "run", change)
    photo = next((tiny_data / "val" / "class_0").iterdir())
    for argv in (["--evaluate", tmp_path / "run" / "best.pth", "--data", tiny_data],
                 ["--predict", photo, "--checkpoint", tmp_path / "run" / "best.pth"]):
        assert main.main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert len(_lines(err)) == 1, err
        assert err.startswith(f"error: {config} is not a run config this project wrote: {says}"), err


def test_a_config_within_bounds_is_read_and_every_violation_is_a_line(tmp_path):
    _config(tmp_path / "ok", lambda c: c)
    assert context_for(tmp_path / "ok" / "best.pth", None).image_size == 32
    # --epochs 1 on a staged recipe cuts its first stage short: that run's config reads back
    _config(tmp_path / "cut", lambda c: c | {"recipe": c["recipe"] | {"first_epochs": 3, "first_lrs": {"all": 1e-2},
                                                                      "train_epochs": 1}})
    assert context_for(tmp_path / "cut" / "best.pth", None).image_size == 32
    edits = {k: v for change, _ in OPTION_EDITS[:4] for k, v in change.items()}
    config = _config(tmp_path / "bad", lambda c: c | {"options": c["options"] | edits})
    with pytest.raises(SchemaError) as caught:
        context_for(tmp_path / "bad" / "best.pth", None)
    assert len(caught.value.lines) == 3  # batch_size is edited twice: its last value stands
    head = f"{config} is not a run config this project wrote: options."
    assert all(line.startswith(head) for line in caught.value.lines)


# ----------------------------------------------------------------------------- the options in last.ckpt
@pytest.mark.parametrize("edit, says", OPTION_EDITS + [({"data": None, "epochs": 0}, "options.epochs = 0 is not"),
                                        ({"folds": 5, "inner_fold": 7}, "options.folds = 5 and options.inner_fold = 7 "
                                                                        "do not fit")])
def test_a_checkpoint_whose_options_are_out_of_bounds_does_not_resume(tmp_path, edit, says):
    options = dataclasses.asdict(RunOptions(data=Path("d"))) | {"data": "d", "out": "runs"}
    ckpt = {"config": {"options": options | edit}}
    with pytest.raises(SchemaError) as caught:
        resume_options(ckpt, {}, tmp_path / "last.ckpt")
    assert caught.value.lines == [line for line in caught.value.lines if line.startswith(f"{tmp_path / 'last.ckpt'}: ")]
    assert any(says in line for line in caught.value.lines), caught.value.lines
    with pytest.raises(SchemaError, match="options is missing"):
        resume_options({"config": {}}, {}, tmp_path / "last.ckpt")


# ----------------------------------------------------------------------------- the command line
@pytest.mark.parametrize("argv", [["--epochs", "10001"], ["--batch-size", "0"], ["--batch-size", "70000"],
                                  ["--image-size", "5000"], ["--seed", "-1"], ["--patience", "0"]])
def test_the_command_line_takes_its_bounds_from_the_schema(tmp_path, capsys, argv):
    with pytest.raises(SystemExit) as caught:
        main.main(["-e", "resnet_scratch", "--data", str(tmp_path), *argv])
    assert caught.value.code == 2 and f"argument {argv[0]}" in capsys.readouterr().err


# ----------------------------------------------------------------------------- an exported description
DESCRIPTION = {"format": export.FORMAT, "classes": ["ant", "bee"], "backbone": "tiny", "image_size": 32,
               "resize": val_resize(32), "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
               "single_logit": False}


@pytest.mark.parametrize("edit, says", [
    ({"image_size": 10**6}, "image_size = 1000000 is not a whole number >= 8 and <= 4096"),
    ({"image_size": "32"}, 'image_size is str "32", which is not a whole number >= 8 and <= 4096'),
    ({"image_size": 0}, "image_size = 0 is not a whole number >= 8"),
    ({"resize": -37}, "resize = -37 is not a whole number >= 8"),
    ({"std": [1e9, 0.2, 0.2]}, "std = [1000000000.0, 0.2, 0.2] is not 3 numbers (R, G, B) (each > 0 and <= 1)"),
    ({"std": [0.2, 0.0, 0.2]}, "std = [0.2, 0.0, 0.2] is not 3 numbers (R, G, B) (each > 0"),
    ({"mean": ["0.5", 0.5, 0.5]}, 'mean = ["0.5", 0.5, 0.5] is not 3 numbers (R, G, B)'),
    ({"classes": ["ant"]}, 'classes = ["ant"] is not a list of 2 or more distinct names'),
    ({"mean": [999, 0.5, 0.5]}, "mean = [999, 0.5, 0.5] is not 3 numbers (R, G, B) (each >= 0 and <= 1)"),
    ({"mean": [0.5, -0.1, 0.5]}, "mean = [0.5, -0.1, 0.5] is not 3 numbers (R, G, B) (each >= 0 and <= 1)"),
    ({"std": [0.2, 0.2, 1.5]}, "std = [0.2, 0.2, 1.5] is not 3 numbers (R, G, B) (each > 0 and <= 1)"),
    ({"image_size": 4097}, "image_size = 4097 is not a whole number >= 8 and <= 4096"),
    ({"resize": 5000}, "resize = 5000 is not a whole number >= 8 and <= 4681"),
    ({"single_logit": "no"}, 'single_logit is str "no", which is not true or false'),
])
def test_an_exported_description_out_of_bounds_is_one_line_each(tmp_path, edit, says):
    outputs = lambda size: torch.zeros(1, 2)  # noqa: E731 - a model of 2 outputs that takes any size
    assert export._description_problems(DESCRIPTION, outputs) == []
    assert export._description_problems(DESCRIPTION | edit, outputs) == [says] or \
        export._description_problems(DESCRIPTION | edit, outputs)[0].startswith(says)
    missing = export._description_problems({k: v for k, v in DESCRIPTION.items() if k != next(iter(edit))}, outputs)
    assert missing == [f"{next(iter(edit))} is missing (it must be {schema.DESCRIPTION[next(iter(edit))].bound()})"]
    with pytest.raises(SchemaError) as caught:
        export.check_description(DESCRIPTION | edit | {"backbone": 3}, tmp_path / "m.onnx", lambda x: torch.zeros(1, 2))
    assert len(caught.value.lines) == 2 and all(line.startswith(f"{tmp_path / 'm.onnx'}: its description")
                                                for line in caught.value.lines)
