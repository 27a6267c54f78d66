"""TensorBoard logging (`--tensorboard`, tl/engine/tensorboard.py): the tags and steps of the event
files, read back with TensorBoard's own reader, across stages and across an interrupted and
resumed run. Tiny images: seconds."""

from __future__ import annotations

import csv
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import main
import tl.engine.tensorboard

pytestmark = pytest.mark.usefixtures("own_cache_dir")


def _scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _tb_run(data, out, recipe, weights, *extra):
    argv = ["-e", recipe, "-b", "tiny", "--data", str(data), "--out", str(out), "--epochs", "3", "--batch-size", "5",
            "--no-progress", "--weights", str(weights), "--tensorboard", *extra]
    return main.main(argv)


def test_tensorboard_logs_phases_per_epoch_and_rates_per_step_across_stages(tiny_data, pretrained, tmp_path):
    assert _tb_run(tiny_data, tmp_path / "a", "two_stage", pretrained) == 0
    (run_dir,) = (tmp_path / "a").iterdir()
    scalars = _scalars(run_dir)
    steps = 5  # 24 train images in batches of 5
    assert set(scalars) == {"loss/train", "acc/train", "loss/val", "acc/val", "lr/body", "lr/neck", "lr/head"}
    assert [s for s, _ in scalars["loss/val"]] == [0, 5, 10, 15]  # epoch 0's baseline, then each epoch's end
    assert [s for s, _ in scalars["acc/train"]] == [5, 10, 15]
    assert [s for s, _ in scalars["lr/head"]] == list(range(1, 3 * steps + 1))  # the count goes on across stages
    history = list(csv.DictReader((run_dir / "history.csv").open()))
    assert [v for _, v in scalars["loss/val"]] == pytest.approx([float(r["loss"]) for r in history
                                                                 if r["phase"] == "val"])
    head = [v for _, v in scalars["lr/head"]]
    # stage 1 (1 epoch, one-cycle from 2e-3/25 up), then stage 2's fresh one-cycle from 1e-3/5
    assert head[0] == pytest.approx(2e-3 / 25) and head[steps] == pytest.approx(1e-3 / 5)
    assert json.loads((run_dir / "config.json").read_text())["options"]["tensorboard"] is True


def test_a_resumed_run_goes_on_at_the_right_step(tiny_data, pretrained, tmp_path, monkeypatch):
    assert _tb_run(tiny_data, tmp_path / "full", "modern_finetune", pretrained) == 0
    real = tl.engine.tensorboard.TensorBoardLog.log_step

    def interrupted(self, epoch):  # Ctrl-C in the middle of epoch 3 (5 steps an epoch), after 3 of its steps
        real(self, epoch)
        if self.step == 13:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(tl.engine.tensorboard.TensorBoardLog, "log_step", interrupted)
        assert _tb_run(tiny_data, tmp_path / "half", "modern_finetune", pretrained) == 130
    (half,) = (tmp_path / "half").iterdir()
    assert max(s for s, _ in _scalars(half)["lr/head"]) == 13  # steps after the checkpoint (epoch 2) are on disk
    assert main.main(["--resume", str(half / "last.ckpt"), "--no-progress"]) == 0
    (full,) = (tmp_path / "full").iterdir()
    want, got = _scalars(full), _scalars(half)
    assert set(got) == set(want)
    for tag in want:
        assert [s for s, _ in got[tag]] == [s for s, _ in want[tag]], tag  # no step twice, none missing
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in want[tag]], rel=1e-5), tag
