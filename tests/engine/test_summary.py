"""tl/engine/summary.py: the summary a run prints shows shapes and trainable counts, and
changes nothing in the model or the random stream."""

from __future__ import annotations

import pytest
import torch

from tl.engine.summary import format_parameter_table
from tl.engine.weights import build_model
from tl.models import get_backbone, set_trainable


def test_summary_shows_shapes_and_counts_and_changes_nothing(tiny_backbone):
    model = build_model("resnet18", 2, "none")
    set_trainable(model, get_backbone("resnet18"), ["head"])
    model.train()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    text = format_parameter_table(model, (1, 3, 64, 64))
    assert "Trainable params: 1,026" in text and "Total params: 11,177,538" in text
    assert "[1, 512, 1, 1]" in next(line for line in text.splitlines() if "(avgpool)" in line)
    assert next(line for line in text.splitlines() if "(fc)" in line).split()[-1] == "True"
    assert next(line for line in text.splitlines() if "(layer4)" in line).split()[-1] == "False"
    assert "trainable (2 of 62 tensors): fc.weight, fc.bias" in text
    assert model.training  # mode restored
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())  # BatchNorm statistics kept
    assert torch.equal(rng, torch.get_rng_state())  # the run's random stream untouched


@pytest.mark.parametrize("backbone,groups,expected", [
    ("resnet18", ["head"], 1026), ("vgg16", ["head"], 8194), ("efficientnet_lite0", ["head"], 2562),
    ("resnet18", ["neck", "head"], 8_394_754),
])
def test_summary_counts_trainable_parameters(backbone, groups, expected):
    model = build_model(backbone, 2, "none")
    set_trainable(model, get_backbone(backbone), groups)
    table = format_parameter_table(model, (1, 3, 64, 64))  # torchinfo's summary
    assert f"Trainable params: {expected:,}\n" in table
    if backbone == "resnet18":  # output shapes of one 64x64 image
        assert "[1, 512, 1, 1]" in next(line for line in table.splitlines() if "(avgpool)" in line)
        assert "[1, 2]" in next(line for line in table.splitlines() if "(fc)" in line)
