"""tl/engine/device.py: the channels_last layout by default where it was measured faster, and
recorded in config.json as resolved."""

from __future__ import annotations

import torch

import main
from tests.helpers import finetune_one_epoch
from tl.engine.device import default_channels_last
from tl.engine.options import RunOptions


def test_channels_last_by_default_is_the_layout_measured_faster_on_the_device(tiny_data, tiny_backbone, tmp_path):
    assert default_channels_last(torch.device("cpu")) is True  # results/benchmark.md
    assert default_channels_last(torch.device("cuda")) is False  # measured on an H100 and an H200 (device.py)
    args = main.build_parser().parse_args(["-e", "resnet_finetune"])
    assert args.channels_last is None and RunOptions(data=tiny_data).channels_last is None
    a = finetune_one_epoch(tiny_data, tmp_path / "a")
    assert a.config["options"]["channels_last"] is True  # recorded as resolved
    b = finetune_one_epoch(tiny_data, tmp_path / "b", channels_last=False)
    assert b.config["options"]["channels_last"] is False
