"""experiments/lr_table.py: one row per recipe, its page and each recipe's range test."""

from __future__ import annotations

import csv

import pytest


@pytest.mark.usefixtures("own_cache_dir")
def test_lr_table_writes_one_row_per_recipe(tiny_data, pretrained, tmp_path, capsys):
    from experiments import lr_table

    argv = ["--data", str(tiny_data), "--backbone", "tiny", "--weights", str(pretrained), "--recipes", "resnet_frozen",
            "two_stage", "--steps", "6", "--quick", "--out", str(tmp_path / "results"), "--runs-dir",
            str(tmp_path / "runs")]
    assert lr_table.main(argv) == 0
    rows = list(csv.DictReader((tmp_path / "results" / "lr_finder.csv").open()))
    assert [(r["recipe"], r["stage"], r["group"], r["status"]) for r in rows] == [
        ("resnet_frozen", "train", "head", "ok"), ("two_stage", "frozen body", "head", "ok")]
    assert [float(r["documented_lr"]) for r in rows] == [1e-3, 2e-3]
    for r in rows:
        assert float(r["ratio"]) == pytest.approx(float(r["suggested_lr"]) / float(r["documented_lr"]))
    md = (tmp_path / "results" / "lr_finder.md").read_text()
    assert "python -m experiments.lr_table --data" in md and "| two_stage | frozen body | head | 2.0e-03 |" in md
    assert len(list((tmp_path / "runs").iterdir())) == 2  # each recipe's plot and CSV


@pytest.mark.parametrize("problem, status", [("interrupt", 130), ("full disk", 2), ("bad input", 0)])
def test_ctrl_c_and_a_full_disk_stop_the_table_a_recipes_problem_is_a_row(tiny_data, tmp_path, monkeypatch,
                                                                          capsys, problem, status):

    import tl.engine.lr_finder
    from experiments import lr_table
    from tests.helpers import failing_with
    from tl.engine.command import command

    monkeypatch.setattr(tl.engine.lr_finder, "find_lr", failing_with(problem))
    out = tmp_path / "results"
    code = command(lambda: lr_table.main(["--data", str(tiny_data), "--recipes", "resnet_frozen", "--quick",
                                          "--out", str(out), "--runs-dir", str(tmp_path / "runs")]))
    assert code == status, capsys.readouterr().err
    assert (out / "lr_finder.csv").exists() == (status == 0)
