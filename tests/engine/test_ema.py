"""tl/engine/ema.py: with --ema, val scores the average of the weights, and best.pth and the
headline are that average's, also when the best val epoch is an earlier one."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import main
import tl.engine.run
from tests.conftest import write_image_folder
from tests.helpers import train_with_ema, two_class_tiny_net
from tl.engine import checkpoint
from tl.engine.checkpoint import load_state_file
from tl.engine.ema import update_after_step, weight_average
from tl.engine.evaluate import evaluate, split_loader
from tl.engine.model_loading import context_for, load_model
from tl.engine.run import combine
from tl.loop import Hooks, train_model


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


def _bright_loaders(n=8, size=8):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, size, size, generator=g), torch.arange(n) % 2
    x[y == 1] += 1.0  # learnable: class 1 is brighter
    ds = TensorDataset(x, y)
    return {"train": DataLoader(ds, batch_size=4, shuffle=True, generator=g), "val": DataLoader(ds, batch_size=8)}


@pytest.mark.usefixtures("own_cache_dir")
def test_the_average_is_the_hand_computed_exponential_average_with_batchnorm_buffers():
    net, decay = two_class_tiny_net(), 0.8
    ema = weight_average(net, decay)
    seen = [{k: v.detach().clone() for k, v in net.state_dict().items()}]  # the weights before training
    record = lambda epoch: seen.append({k: v.detach().clone() for k, v in net.state_dict().items()})  # noqa: E731
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    hooks = Hooks(after_step=combine(update_after_step(ema, net), record), progress=False,
                  log=lambda s: None)
    train_model(net, _bright_loaders(), nn.CrossEntropyLoss(), optimizer, 3, hooks=hooks)
    assert len(seen) == 1 + 2 * 2  # two training epochs of 2 steps, each seen by both step callbacks
    expected = dict(seen[0])
    for state in seen[1:]:
        expected = {k: decay * expected[k] + (1 - decay) * state[k] if state[k].is_floating_point() else state[k]
                    for k in state}
    averaged = ema.module.state_dict()
    assert int(ema.n_averaged) == len(seen)
    for k, v in expected.items():
        if v.is_floating_point():  # weights, and BatchNorm's running mean and variance
            assert torch.allclose(averaged[k], v, atol=1e-6, rtol=1e-5), k
    bn = "stem.1.running_mean"
    assert not torch.allclose(averaged[bn], seen[-1][bn]) and not torch.allclose(averaged[bn], seen[0][bn])


@pytest.mark.usefixtures("own_cache_dir")
def test_val_scores_the_average_and_the_best_epoch_keeps_its_weights():
    """With a decay close to 1 the average hardly leaves the starting weights: every val row is
    the baseline's, though the training weights moved (without it the rows change)."""
    rows = {}
    for decay in (0.0, 1 - 1e-7):
        net = two_class_tiny_net()
        ema = weight_average(net, decay)
        steps = [update_after_step(ema, net)] if ema is not None else []
        scored = net if ema is None else ema.module
        at_epoch_end = []  # the scored model's weights after each epoch

        def keep(epoch, history, scored=scored, at_epoch_end=at_epoch_end):
            at_epoch_end.append({k: v.clone() for k, v in scored.state_dict().items()})

        hooks = Hooks(after_step=combine(*steps), validate_with=None if ema is None else ema.module,
                      end_of_epoch=keep, progress=False, log=lambda s: None)
        history = train_model(net, _bright_loaders(), nn.CrossEntropyLoss(), torch.optim.SGD(net.parameters(), lr=0.5),
                              3, hooks=hooks)
        rows[decay] = [r["loss"] for r in history.val()]
        best = at_epoch_end[history.best_epoch]
        assert all(torch.equal(v, best[k]) for k, v in history.best_state.items())
        if ema is not None:
            assert not torch.equal(net.fc.weight, ema.module.fc.weight)
    assert rows[1 - 1e-7] == pytest.approx([rows[1 - 1e-7][0]] * 3, abs=1e-5)
    assert max(abs(a - rows[0.0][0]) for a in rows[0.0][1:]) > 1e-3


@pytest.mark.usefixtures("own_cache_dir")
def test_under_the_feature_cache_the_average_is_that_of_the_whole_network(tiny_data, pretrained, tmp_path):
    """Cached (the loop trains the head on stored features) and uncached (the whole network on
    images) average the same weights: the same val rows and best.pth, up to the last float bits
    of the cache's folded BatchNorm."""
    runs = [train_with_ema(tiny_data, tmp_path / name, "resnet_frozen", 2, pretrained, feature_cache=cache)
            for name, cache in (("cached", True), ("uncached", False))]
    configs = [json.loads((r / "config.json").read_text()) for r in runs]
    assert configs[0]["feature_cache"].startswith("train + val") and configs[1]["feature_cache"] == "off"
    rows = [checkpoint.load_checkpoint(r / "last.ckpt")["history"]["rows"] for r in runs]
    assert [r["loss"] for r in rows[0]] == pytest.approx([r["loss"] for r in rows[1]], abs=1e-5)
    best = [checkpoint.load_state_file(r / "best.pth") for r in runs]
    assert all(torch.allclose(t, best[1][k], atol=1e-5) for k, t in best[0].items())


