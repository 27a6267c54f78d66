"""`python main.py -e NAME --find-lr`: the suggestion printed beside the recipe's own rate, no run
folder written, and bad input (a first stage that trains nothing, --find-lr with --resume) as
one error line and exit status 2."""

from __future__ import annotations

import functools
import types

import pytest
import torch

import main
from experiments.recipes import resnet_frozen
from tl.engine import lr_finder


@pytest.mark.usefixtures("own_cache_dir")
def test_find_lr_on_the_command_line_prints_the_suggestion_beside_the_recipes_rate(tiny_data, pretrained, tmp_path,
                                                                                   capsys, monkeypatch):
    monkeypatch.setattr(lr_finder, "find_lr", functools.partial(lr_finder.find_lr, steps=20))  # seconds
    argv = ["-e", "resnet_frozen", "-b", "tiny", "--weights", str(pretrained), "--data", str(tiny_data), "--out",
            str(tmp_path / "out"), "--find-lr", "--quick", "--batch-size", "4", "--no-progress"]
    assert main.main(argv) == 0
    out = capsys.readouterr().out
    assert "suggested rate for group 'head'" in out and "the recipe's: 1.0e-03" in out
    (folder,) = (tmp_path / "out").iterdir()
    assert not (folder / "config.json").exists() and not (folder / "last.ckpt").exists()


def _frozen_everything(model, spec, recipe):
    for p in model.parameters():
        p.requires_grad = False
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.mark.usefixtures("own_cache_dir")
def test_bad_input_is_one_error_line_and_status_2(tiny_data, pretrained, tmp_path, capsys, monkeypatch):
    frozen = types.SimpleNamespace(RECIPE=resnet_frozen.RECIPE, build=_frozen_everything)
    monkeypatch.setattr("experiments.get_experiment", lambda name, data=None, backbone=None: frozen)
    argv = ["-e", "resnet_frozen", "-b", "tiny", "--weights", str(pretrained), "--data", str(tiny_data), "--out",
            str(tmp_path / "out"), "--find-lr", "--quick", "--no-progress"]
    assert main.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: resnet_frozen's first stage ('train') trains no parameter") and err.count("\n") == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    monkeypatch.undo()
    assert main.main(["--resume", str(tmp_path / "last.ckpt"), "--find-lr"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --find-lr") and "--resume" in err and err.count("\n") == 1


