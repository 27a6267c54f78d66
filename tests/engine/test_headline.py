"""tl/engine/headline.py: the headline number is never chosen on the images it is scored on.

With a test/ split: the epoch chosen on val, scored on test. Without one: the final
epoch's val accuracy. Two model states that always answer one class, on unbalanced
splits, tell the cases apart: each gives a different accuracy on each split."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from experiments import get_experiment
from tests.conftest import write_image_folder
from tl.data import build_transforms
from tl.engine.headline import score_headline
from tl.engine.options import RunOptions
from tl.engine.run import run
from tl.engine.selection import image_datasets
from tl.engine.weights import build_model
from tl.loop import History
from tl.models import get_backbone


def _unbalanced(root, test: bool):
    """val: 3 class_0 / 6 class_1; test: 6 class_0 / 2 class_1."""
    data = write_image_folder(root, val=6, phases=("train", "val", "test") if test else ("train", "val"))
    for p in sorted((data / "val" / "class_0").iterdir())[3:]:
        p.unlink()
    if test:
        for p in sorted((data / "test" / "class_1").iterdir())[2:]:
            p.unlink()
    return data


def _always(model, cls: int) -> dict:
    """A state of `model` that answers `cls` for every image (zero weights, one bias)."""
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.tensor([1.0, 0.0]) if cls == 0 else torch.tensor([0.0, 1.0]))
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("has_test", [True, False])
def test_headline_is_test_of_the_val_choice_else_final_val(tmp_path, tiny_backbone, has_test):
    data = _unbalanced(tmp_path / "data", has_test)
    spec = get_backbone(tiny_backbone)
    transforms = build_transforms(spec.mean, spec.std, size=32, augment=False)
    sets = image_datasets(data, transforms, phases=("train", "val", "test") if has_test else ("train", "val"))
    model = build_model(tiny_backbone, 2, "none")
    best = _always(model, 0)  # the epoch chosen on val ...
    _always(model, 1)  # ... and the final epoch's weights, which the model holds now
    opts = RunOptions(data=data, image_size=32)
    result = score_headline(model, model, History(best_state=best), sets["val"], sets["val"], sets.get("test"),
                            ["class_0", "class_1"], opts, torch.device("cpu"), tmp_path).record
    predictions = pd.read_csv(tmp_path / "headline_predictions.csv")
    if has_test:  # best state ("always class_0") on test: 6 of 8 right
        assert result["headline"] == "test, epoch chosen on val"
        assert result["headline_acc"] == pytest.approx(6 / 8) and result["test_acc"] == result["headline_acc"]
        assert len(predictions) == 8 and predictions.path.str.startswith("test/").all()
        assert (predictions.prediction == "class_0").all()
    else:  # final state ("always class_1") on val: 6 of 9 right
        assert result["headline"] == "val, final epoch"
        assert result["headline_acc"] == pytest.approx(6 / 9) and result["test_acc"] is None
        assert len(predictions) == 9 and predictions.path.str.startswith("val/").all()
        assert (predictions.prediction == "class_1").all()
    assert (predictions.label == predictions.prediction).mean() == pytest.approx(result["headline_acc"])


@pytest.mark.parametrize("has_test", [True, False])
def test_a_run_records_its_headline(tmp_path, tiny_backbone, has_test):
    data = write_image_folder(tmp_path / "data", phases=("train", "val", "test") if has_test else ("train", "val"))
    module = get_experiment("resnet_frozen")
    opts = RunOptions(data=data, backbone=tiny_backbone, weights="none", epochs=3, image_size=32, workers=0,
                      out=tmp_path / "runs", progress=False)
    result = run(module.RECIPE, module.build, opts, log=lambda s: None)
    res = json.loads((result.run_dir / "config.json").read_text())["results"]
    predictions = pd.read_csv(result.run_dir / "headline_predictions.csv")
    correct = (predictions.label == predictions.prediction).mean()
    assert res["headline_acc"] == pytest.approx(correct)
    if has_test:
        assert res["headline"] == "test, epoch chosen on val" and res["test_acc"] == res["headline_acc"]
        assert len(predictions) == 12 and predictions.path.str.startswith("test/").all()
    else:  # the loop's own last val row, and the same number from the stored predictions
        assert res["headline"] == "val, final epoch" and res["headline_acc"] == pytest.approx(res["final_val_acc"])
        assert len(predictions) == 12 and predictions.path.str.startswith("val/").all()
