"""experiments/data_efficiency.py on tiny data: its table, its plot, a note for a missing recipe, and what stops it."""

from __future__ import annotations

import json

import pytest
from PIL import Image


def test_data_efficiency_quick_writes_table_and_plot_and_notes_a_missing_recipe(tiny_data, tiny_backbone, tmp_path,
                                                                                 capsys):
    import pandas as pd

    from experiments import data_efficiency

    out, runs = tmp_path / "out", tmp_path / "runs"
    argv = ["--data", str(tiny_data), "--backbone", "tiny", "--quick", "--strategies", "resnet_scratch",
            "not_yet_written", "--sizes", "2", "5", "all", "--seeds", "0", "1", "--out", str(out),
            "--runs-dir", str(runs)]
    assert data_efficiency.main(argv) == 0
    assert "recipe 'not_yet_written' does not exist yet" in capsys.readouterr().out
    table = pd.read_csv(out / "data_efficiency.csv", dtype={"images_per_class": str})
    scratch = table[table.strategy == "resnet_scratch"]
    assert (scratch.status == "ok").all() and len(scratch) == 6
    assert dict(zip(scratch.images_per_class, scratch.train_images)) == {"2": 4, "5": 10, "all": 16}  # --quick: 8
    assert (table[table.strategy == "not_yet_written"].status == "not run").all()
    trained = {}  # the images each run trained on: the same subset for both training seeds
    for run, size in zip(scratch.run, scratch.images_per_class):
        config = json.loads((runs / run / "config.json").read_text())
        trained.setdefault(size, set()).add(config["data_fingerprint"])
    assert all(len(prints) == 1 for prints in trained.values())
    with Image.open(out / "data_efficiency.png") as img:
        assert img.width >= 300
    assert "| resnet_scratch | 1 |" in (out / "data_efficiency.md").read_text()

    # a strategy run later joins the table and the other rows stay (the tiny backbone has no
    # ImageNet weights, so the frozen recipe's row says why it did not run)
    assert data_efficiency.main(["--data", str(tiny_data), "--backbone", "tiny", "--quick", "--strategies",
                                 "resnet_frozen", "--sizes", "2", "--seeds", "0", "--out", str(out),
                                 "--runs-dir", str(tmp_path / "runs2")]) == 0
    table = pd.read_csv(out / "data_efficiency.csv")
    assert "ImageNet weights" in table[table.strategy == "resnet_frozen"].reason.iloc[0]
    assert set(table.strategy) == {"resnet_frozen", "not_yet_written", "resnet_scratch"} and len(table) == 13


@pytest.mark.parametrize("problem, status", [
    ("interrupt", 130), ("full disk", 2), ("lock lost", 2), ("bad input", 0), ("bug", 0)])
def test_ctrl_c_and_the_machines_failures_stop_the_study_a_recipes_problem_is_a_row(
        tiny_data, tiny_backbone, tmp_path, monkeypatch, capsys, problem, status):
    """Every run of the study goes through experiments.common.result_or_reason: Ctrl-C/SIGTERM,
    a full disk and a lock taken away end the study (exit 130 / 2, nothing written); a recipe that
    cannot run or fails is its row (exit 0)."""

    import tl.engine.run
    from experiments import data_efficiency
    from tests.helpers import failing_with
    from tl.engine.command import command

    monkeypatch.setattr(tl.engine.run, "run", failing_with(problem))
    out = tmp_path / "out"
    code = command(lambda: data_efficiency.main(["--data", str(tiny_data), "--backbone", "tiny", "--quick",
                                                 "--strategies", "resnet_scratch", "--sizes", "2", "--seeds", "0",
                                                 "--out", str(out), "--runs-dir", str(tmp_path / "runs")]))
    assert code == status, capsys.readouterr().err
    assert (out / "data_efficiency.csv").exists() == (status == 0)
