"""`python main.py --export RUN`: the exported ONNX / TorchScript file agrees with PyTorch, describes
itself (classes, sizes, normalisation) so that --predict needs no config.json, and a run
without best.pth or a model ONNX cannot express is one error line and exit status 2."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import main
from tests.conftest import TinyNet
from tests.helpers import train_three_epochs
from tl.models import BACKBONES, Backbone, get_backbone


@pytest.mark.parametrize("fmt,suffix", [("onnx", ".onnx"), ("torchscript", ".pt")])
def test_export_agrees_with_pytorch_and_predicts_without_config(fmt, suffix, quick_run, tiny_data, tmp_path, capsys):
    assert main.main(["--export", str(quick_run), "--format", fmt]) == 0
    exported = quick_run / f"model{suffix}"
    check = json.loads((quick_run / f"model{suffix}.check.json").read_text())
    assert check["ok"] and check["images"] == 12 and check["top1_agreement"] == 1.0
    assert check["max_abs_logit_diff"] <= 1e-4
    assert "top-1 agreement 1.0000" in capsys.readouterr().out

    photos = [p for k in (0, 1) for p in sorted((tiny_data / "val" / f"class_{k}").iterdir())[:2]]
    assert main.main(["--predict", *map(str, photos), "--checkpoint", str(quick_run / "best.pth")]) == 0
    from_pth = capsys.readouterr().out.splitlines()
    alone = tmp_path / "shipped"
    alone.mkdir()
    shutil.copy(exported, alone / exported.name)  # no config.json, no run folder: the file alone
    assert main.main(["--predict", *map(str, photos), "--checkpoint", str(alone / exported.name)]) == 0
    from_file = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in from_file] == [line.split()[1] for line in from_pth]  # same top class
    for a, b in zip(from_pth, from_file):
        assert float(a.split()[2].rstrip(",")) == pytest.approx(float(b.split()[2].rstrip(",")), abs=2e-3)


def test_exported_file_describes_itself(quick_run):
    from tl.engine.export import load_exported

    assert main.main(["--export", str(quick_run)]) == 0
    model, meta = load_exported(quick_run / "model.onnx")
    assert meta["classes"] == ["class_0", "class_1"] and meta["backbone"] == "tiny"
    assert meta["image_size"] == 64 and meta["mean"] == list(get_backbone("tiny").mean)
    assert model(torch.zeros(3, 3, 64, 64)).shape == (3, 2)  # any batch size


def test_export_of_a_run_without_best_pth_is_exit_2(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main.main(["--export", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "best.pth not found" in err and "Traceback" not in err


class EigNet(TinyNet):
    """A forward with an operator ONNX has no counterpart for (a symmetric eigen-solver)."""

    def forward(self, x):
        v = self.pool(self.block(self.stem(x))).flatten(1)  # (B, 16)
        return self.fc(v) + torch.linalg.eigvalsh(v.T @ v)[: self.fc.out_features]


def test_a_model_onnx_cannot_express_is_a_message_and_exit_2(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(BACKBONES, "eig", Backbone("eig", EigNet, head="fc", neck=("block",)))
    run_dir = train_three_epochs(tiny_data, tmp_path / "runs", "eig")
    assert main.main(["--export", str(run_dir), "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot export this eig model to onnx") and "try --format torchscript" in err
    assert "Traceback" not in err and not (run_dir / "model.onnx").exists()


