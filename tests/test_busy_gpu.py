"""Issue 24, "A GPU kept busy": what of it runs on a CPU. The channels_last default by device,
the batched augmentation of `--device-images`, loss sums kept on the device, `--compile`."""

import torch

import main
from experiments import get_experiment
from tl.engine.device import default_channels_last
from tl.engine.options import RunOptions
from tl.engine.run import run


def _run(data, out, **options):
    module = get_experiment("resnet_finetune")
    opts = RunOptions(data=data, backbone="tiny", weights="none", epochs=1, batch_size=5, out=out,
                      progress=False, plots=False, **options)
    return run(module.RECIPE, module.build, opts, log=lambda s: None)


def test_channels_last_by_default_is_the_layout_measured_faster_on_the_device(tiny_data, tiny_backbone, tmp_path):
    assert default_channels_last(torch.device("cpu")) is True  # results/benchmark.md
    assert default_channels_last(torch.device("cuda")) is False  # issue 24's H100 figures
    args = main.build_parser().parse_args(["-e", "resnet_finetune"])
    assert args.channels_last is None and RunOptions(data=tiny_data).channels_last is None
    assert _run(tiny_data, tmp_path / "a").config["options"]["channels_last"] is True  # recorded as resolved
    assert _run(tiny_data, tmp_path / "b", channels_last=False).config["options"]["channels_last"] is False
