"""tl/engine/checkpoint.py: a checkpoint holds everything a resume needs (the grad scaler's state
included) and loads back; a pickled whole model needs an explicit flag; a state_dict that does not
fit its model is explained (`load_into`)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from tests.helpers import train_scratch
from tl import TLError
from tl.engine import checkpoint
from tl.engine.checkpoint import load_into
from tl.engine.weights import build_model


def test_checkpoint_round_trip_holds_everything(tiny_data, tiny_backbone, tmp_path):
    run_dir = train_scratch(tiny_data, tmp_path / "runs", 3, "--save-every-epoch")
    ckpt = checkpoint.load_checkpoint(run_dir / "last.ckpt")
    assert set(ckpt) >= {"epoch", "model", "optimizer", "scheduler", "scaler", "history", "config", "classes", "rng",
                         "wall_seconds"}
    assert ckpt["classes"] == ["class_0", "class_1"] and ckpt["config"]["experiment"] == "resnet_scratch"
    assert all(torch.equal(t, checkpoint.load_state_file(run_dir / "03.pth")[k]) for k, t in ckpt["model"].items())
    # best.pth holds the weights of the epoch with the best val accuracy (ties: lower loss)
    val = pd.read_csv(run_dir / "history.csv").query("phase == 'val'")
    best = val.sort_values(["acc", "loss"], ascending=[False, True]).epoch.iloc[0]
    assert json.loads((run_dir / "config.json").read_text())["results"]["best_epoch"] == best
    state = checkpoint.load_state_file(run_dir / "best.pth")
    assert all(torch.equal(t, checkpoint.load_state_file(run_dir / f"{best:02d}.pth")[k]) for k, t in state.items())
    model = build_model("tiny", 2, "none")
    load_into(model, state, "best.pth")


def test_pickled_whole_models_need_an_explicit_flag(tmp_path):
    model = build_model("resnet18", 2, "none")
    torch.save(model, tmp_path / "whole.pt")  # documents 000/004's torch.save(model)
    with pytest.raises(TLError, match="allow-pickle"):
        checkpoint.load_state_file(tmp_path / "whole.pt")
    state = checkpoint.load_state_file(tmp_path / "whole.pt", allow_pickle=True)
    assert torch.equal(state["fc.weight"], model.fc.weight)


@pytest.mark.usefixtures("own_cache_dir")
def test_the_grad_scaler_state_is_saved_and_restored(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    path = checkpoint.save_checkpoint(tmp_path / "last.ckpt", epoch=1, model=model, optimizer=optimizer,
                                      scheduler=None, scaler=scaler, history={}, config={}, classes=["a"],
                                      loader_generator=None, wall_seconds=1.0)
    saved = checkpoint.load_checkpoint(path)["scaler"]
    fresh = torch.amp.GradScaler("cpu")
    fresh.load_state_dict(saved)
    assert fresh.get_scale() == 1024.0 and fresh.get_growth_interval() == 7


def test_mismatched_state_dicts_are_explained():
    """load_into names what does not fit: another architecture, or another number of classes."""
    resnet = build_model("resnet18", 2, "none")
    with pytest.raises(TLError, match="another architecture"):
        load_into(resnet, build_model("vgg16", 2, "none").state_dict(), "vgg file")
    with pytest.raises(TLError, match=r"fc.weight: file has shape \(3, 512\).*\(2, 512\)[\s\S]*number of classes"):
        load_into(resnet, build_model("resnet18", 3, "none").state_dict(), "3-class file")
