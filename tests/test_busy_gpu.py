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


def _loop_setup(data, seed=0):
    from tl.data import build_transforms, make_loaders
    from tl.engine.selection import image_datasets
    from tl.engine.weights import build_model
    from tl.loop import seed_everything

    seed_everything(seed)
    sets = image_datasets(data, build_transforms((0.5,) * 3, (0.5,) * 3, size=32, resize=36))
    model = build_model("tiny", len(sets["train"].classes), "none")
    return model, make_loaders(sets, 5, seed=seed)


def test_sums_kept_on_the_device_give_the_same_history_as_the_per_step_item(tiny_data, tiny_backbone):
    """`Hooks(device_sums=True)` is what a CUDA run uses; forced here on the CPU, it must give the
    very numbers of the tutorial's per-step `.item()` (both sum float32 losses in float64)."""
    from tl.loop import Hooks, train_model

    histories, states = [], []
    for device_sums in (False, True):
        model, loaders = _loop_setup(tiny_data)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        h = train_model(model, loaders, torch.nn.CrossEntropyLoss(), opt, num_epochs=3,
                        hooks=Hooks(progress=False, log=lambda s: None, device_sums=device_sums))
        histories.append([{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in h.rows])
        states.append(model.state_dict())
    assert histories[0] == histories[1]
    assert all(type(r["loss"]) is float and type(r["acc"]) is float for r in histories[1])
    for name, tensor in states[0].items():
        assert torch.equal(tensor, states[1][name]), name


def test_with_device_sums_a_non_finite_loss_stops_at_the_phase_end(tiny_data, tiny_backbone):
    import math

    import pytest

    from tl.loop import Hooks, NonFiniteLoss, train_model

    model, loaders = _loop_setup(tiny_data)
    with torch.no_grad():
        model.fc.weight.fill_(math.nan)
    batches = []
    hooks = Hooks(progress=False, log=lambda s: None, device_sums=True,
                  end_of_phase=lambda *a: batches.append(a))
    with pytest.raises(NonFiniteLoss, match="loss became nan in epoch 0: training stopped at the end of the phase"):
        train_model(model, loaders, torch.nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1),
                    num_epochs=2, hooks=hooks)
    assert batches == []  # no row, no checkpoint: the phase never ended
