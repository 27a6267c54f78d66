"""tl/engine/ema.py: with --ema, val scores the average of the weights, and best.pth and the
headline are that average's, also when the best val epoch is an earlier one."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

import main
import tl.engine.run
from tests.conftest import write_image_folder
from tl.engine.checkpoint import load_state_file
from tl.engine.evaluate import evaluate, split_loader
from tl.engine.model_loading import context_for, load_model


class TurnsAgainstTheLabels(nn.Module):
    """Cross-entropy on the true labels for the first `honest` training steps, then on the other
    class's: the later epochs unlearn what the first learned, so an earlier epoch is the best."""

    def __init__(self, honest: int):
        super().__init__()
        self.honest, self.steps = honest, 0

    def forward(self, outputs, labels):
        if torch.is_grad_enabled():  # a training step (val runs without gradients)
            self.steps += 1
            if self.steps > self.honest:
                labels = 1 - labels
        return nn.functional.cross_entropy(outputs, labels)


def _score(weights: Path, data: Path, split: str) -> dict:
    ctx = context_for(weights, None)
    loader, classes = split_loader(data, split, ctx, log=lambda s: None)
    return evaluate(load_model(weights, ctx, len(classes)), loader, torch.device("cpu"), len(classes))


@pytest.mark.parametrize("lr_scale", [100, 1000])
def test_best_pth_and_the_headline_are_the_average_of_an_earlier_best_epoch(tmp_path, tiny_backbone, monkeypatch,
                                                                            capsys, lr_scale):
    """24 train images in batches of 8: 3 steps an epoch, honest for epochs 1 and 2. At --lr-scale 100
    every epoch's val accuracy is 1 and an earlier epoch wins on the lower loss; at 1000 the last
    epochs fall to accuracy 0. Either way best.pth scores on val exactly as history.csv's row of the
    best epoch (the average's weights, not the training weights), it is that epoch's per-epoch file,
    and the headline is best.pth scored on test."""
    monkeypatch.setattr(tl.engine.run, "make_criterion", lambda recipe, weights=None: TurnsAgainstTheLabels(6))
    data = write_image_folder(tmp_path / "data", phases=("train", "val", "test"))
    assert main.main(["-e", "resnet_scratch", "-b", "tiny", "--data", str(data), "--epochs", "5", "--ema", "0.5",
                      "--lr-scale", str(lr_scale), "--image-size", "32", "--no-augment", "--workers", "0",
                      "--save-every-epoch", "--out", str(tmp_path / "runs"), "--no-progress"]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    results = json.loads((run_dir / "config.json").read_text())["results"]
    history = pd.read_csv(run_dir / "history.csv")
    val = history[history.phase == "val"].set_index("epoch")
    best = results["best_epoch"]
    assert 0 < best < 5 and val.loc[5, "loss"] > val.loc[best, "loss"]  # an earlier epoch, and a worse last one
    assert val.loc[best, "acc"] == val.acc.max() == results["best_val_acc"]
    assert f"best val acc {val.loc[best, 'acc']:.4f} at epoch {best}" in capsys.readouterr().out

    best_pth = load_state_file(run_dir / "best.pth")
    epoch_file, last_file = (load_state_file(run_dir / f"{e:02d}.pth") for e in (best, 5))
    assert all(torch.equal(t, epoch_file[k]) for k, t in best_pth.items())  # that epoch's average, bit for bit
    assert not torch.equal(best_pth["fc.weight"], last_file["fc.weight"])
    training = torch.load(run_dir / "last.ckpt", weights_only=True)["model"]
    assert not torch.equal(best_pth["fc.weight"], training["fc.weight"])
    on_val = _score(run_dir / "best.pth", data, "val")  # scored again: the numbers of its history row
    assert on_val["acc"] == val.loc[best, "acc"]
    assert on_val["loss"] == pytest.approx(val.loc[best, "loss"], rel=1e-4, abs=1e-7)

    on_test = _score(run_dir / "best.pth", data, "test")
    assert results["headline"] == "test, epoch chosen on val" and results["headline_acc"] == on_test["acc"]
    headline = pd.read_csv(run_dir / "headline_predictions.csv")
    assert headline.prediction.tolist() == [f"class_{p}" for p in on_test["predictions"]]
