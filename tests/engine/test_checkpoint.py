"""Saving, resuming, evaluating saved models and predicting single images."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

import main
from tl import TLError
from tl.engine import checkpoint, files
from tl.engine.weights import build_model
from tl.models import load_into


def _train(data, out, epochs, *extra):
    argv = ["-e", "resnet_scratch", "-b", "tiny", "--data", str(data), "--out", str(out), "--epochs", str(epochs),
            "--lr-scale", "50", "--batch-size", "5", "--no-progress", *extra]
    assert main.main(argv) == 0
    (run_dir,) = out.iterdir()
    return run_dir


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in rows]


@pytest.mark.parametrize("workers", ["0", "2"])
def test_resume_equals_an_uninterrupted_run(tiny_data, tiny_backbone, tmp_path, workers):
    full = _train(tiny_data, tmp_path / "full", 4, "--workers", workers)
    half = _train(tiny_data, tmp_path / "half", 2, "--workers", workers)
    assert main.main(["--resume", str(half / "last.ckpt"), "--epochs", "4", "--workers", workers,
                      "--no-progress"]) == 0
    a, b = checkpoint.load_checkpoint(full / "last.ckpt"), checkpoint.load_checkpoint(half / "last.ckpt")
    assert a["epoch"] == b["epoch"] == 4
    assert _strip(a["history"]["rows"]) == _strip(b["history"]["rows"])
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for name, tensor in checkpoint.load_state_file(full / "best.pth").items():
        assert torch.equal(tensor, checkpoint.load_state_file(half / "best.pth")[name])
    assert pd.read_csv(half / "history.csv").shape == pd.read_csv(full / "history.csv").shape


def test_checkpoint_round_trip_holds_everything(tiny_data, tiny_backbone, tmp_path):
    run_dir = _train(tiny_data, tmp_path / "runs", 3, "--save-every-epoch")
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


def test_a_crash_during_a_save_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    files.atomic_save({"w": torch.ones(3)}, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # killed in the middle of writing

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        files.atomic_save({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_pickled_whole_models_need_an_explicit_flag(tmp_path):
    model = build_model("resnet18", 2, "none")
    torch.save(model, tmp_path / "whole.pt")  # documents 000/004's torch.save(model)
    with pytest.raises(TLError, match="allow-pickle"):
        checkpoint.load_state_file(tmp_path / "whole.pt")
    state = checkpoint.load_state_file(tmp_path / "whole.pt", allow_pickle=True)
    assert torch.equal(state["fc.weight"], model.fc.weight)


def test_resume_needs_a_training_checkpoint(tmp_path, capsys):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "best.pth")
    assert main.main(["--resume", str(tmp_path / "best.pth")]) == 2
    assert "not a training checkpoint" in capsys.readouterr().err


def test_evaluate_a_file_and_a_folder_of_epochs(tiny_data, tiny_backbone, tmp_path, capsys):
    run_dir = _train(tiny_data, tmp_path / "runs", 3, "--save-every-epoch")
    assert main.main(["--evaluate", str(run_dir / "best.pth"), "--data", str(tiny_data)]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "confusion matrix" in out and "class_1" in out
    assert main.main(["--evaluate", str(run_dir), "--data", str(tiny_data)]) == 0
    table = pd.read_csv(run_dir / "eval_val.csv")
    assert list(table.epoch) == [0, 1, 2, 3]
    history = pd.read_csv(run_dir / "history.csv")
    val = history[history.phase == "val"].set_index("epoch").acc
    assert table.set_index("epoch").acc.round(6).to_dict() == val.round(6).to_dict()  # same weights, same score


def test_evaluate_reports_mismatches(tiny_data, tiny_backbone, three_class_data, tmp_path, capsys):
    run_dir = _train(tiny_data, tmp_path / "runs", 1)
    assert main.main(["--evaluate", str(run_dir / "best.pth"), "--data", str(three_class_data)]) == 2
    assert "trained on classes" in capsys.readouterr().err
    torch.save(build_model("tiny", 3, "none").state_dict(), tmp_path / "three.pth")
    assert main.main(["--evaluate", str(tmp_path / "three.pth"), "--backbone", "tiny",
                      "--data", str(tiny_data)]) == 2
    assert "different sizes: probably another number of classes" in capsys.readouterr().err
    assert main.main(["--evaluate", str(tmp_path / "three.pth"), "--backbone", "resnet18",
                      "--data", str(tiny_data)]) == 2
    assert "another architecture" in capsys.readouterr().err


def test_predict_with_a_checkpoint_uses_the_runs_class_names(hymenoptera, tmp_path, capsys):
    assert main.main(["-e", "resnet_frozen", "-b", "efficientnet_lite0", "--data", str(hymenoptera), "--quick",
                      "--out", str(tmp_path / "runs"), "--no-progress"]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    bee = next((hymenoptera / "val" / "bees").glob("*.jpg"))
    (tmp_path / "broken.jpg").write_text("not a picture")
    code = main.main(["--predict", str(bee), str(tmp_path / "broken.jpg"), "--checkpoint", str(run_dir / "best.pth")])
    out = capsys.readouterr()
    assert code == 2  # one image could not be read: said clearly, the other still classified
    line = next(x for x in out.out.splitlines() if x.startswith(str(bee)))
    named = dict(item.rsplit(" ", 1) for item in line.removeprefix(f"{bee}: ").split(", "))
    assert set(named) == {"ants", "bees"}  # the run's two classes, not ImageNet's names
    assert sum(map(float, named.values())) == pytest.approx(1, abs=2e-3)
    assert "cannot read" in out.out and "1 of 2 image(s)" in out.err
    assert [x for x in (out.out + out.err).splitlines() if x.startswith("error:")] == \
        ["error: 1 of 2 image(s) could not be read"]  # one error: line; the photo's own line says skipped


def test_predict_without_a_checkpoint_names_imagenet_classes(hymenoptera, capsys):
    bees = sorted((hymenoptera / "val" / "bees").glob("*.jpg"))[:3]
    assert main.main(["--predict", *map(str, bees), "--backbone", "efficientnet_lite0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # each image's top 3 ImageNet classes (names from torchvision's metadata, not the file path)
    top3 = [[item.rsplit(" ", 1)[0] for item in line.split(": ", 1)[1].split(", ")] for line in lines]
    assert len(top3) == 3 and sum("bee" in names for names in top3) >= 2  # class 309
