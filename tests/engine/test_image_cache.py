"""Issue 24, "A GPU kept busy": what of it runs on a CPU. The channels_last default by device,
the batched augmentation of `--device-images`, loss sums kept on the device, `--compile`."""

import pytest
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


def _decoded_train(data, size=32, resize=36, policy="standard", device="cpu"):
    from tl.data import build_transforms
    from tl.engine.image_cache import DecodedImages
    from tl.engine.selection import image_datasets

    sets = image_datasets(data, build_transforms((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), size=size,
                                                 resize=resize, policy=policy))
    return DecodedImages(sets["train"], resize=resize, device=device)  # --device-images (on the CPU by default)


def test_batched_crops_draw_the_boxes_and_flips_of_the_per_image_path(tiny_data, monkeypatch):
    from torchvision.transforms import v2

    decoded = _decoded_train(tiny_data)
    assert decoded.collate is not None
    images = decoded.images[:7]
    drawn, flipped = [], []
    real_params, real_flip = v2.RandomResizedCrop.make_params, v2.RandomHorizontalFlip.transform
    torch.manual_seed(3)
    with monkeypatch.context() as m:  # the per-image path, its draws recorded
        m.setattr(v2.RandomResizedCrop, "make_params", lambda self, f: drawn.append(real_params(self, f)) or drawn[-1])
        m.setattr(v2.RandomHorizontalFlip, "transform",
                  lambda self, x, p: flipped.__setitem__(len(drawn) - 1, True) or real_flip(self, x, p))
        flipped.extend([False] * len(images))
        one_by_one = torch.stack([decoded.transform(img) for img in images])
    after_per_image = torch.get_rng_state()
    torch.manual_seed(3)
    boxes, flips = decoded.collate.draw(images)
    assert torch.equal(torch.get_rng_state(), after_per_image)  # the very same draws, no more, no fewer
    assert boxes.tolist() == [[d["top"], d["left"], d["height"], d["width"]] for d in drawn]
    assert flips.tolist() == flipped and 0 < sum(flipped) < len(images)
    batched = decoded.collate.apply(images, boxes, flips)
    assert batched.shape == one_by_one.shape == (7, 3, 32, 32)
    # pixels: the same crop, resized by another interpolation (normalised units; 1/255/0.225 = 0.017)
    diff = (batched - one_by_one).abs()
    assert diff.mean() < 0.05 and diff.max() < 0.6, (diff.mean(), diff.max())


def test_pipelines_that_draw_their_own_numbers_stay_per_image(tiny_data):
    decoded = _decoded_train(tiny_data, policy="strong")  # TrivialAugmentWide
    assert decoded.collate is None
    image, _ = decoded[0]
    assert image.dtype == torch.float32 and image.shape == (3, 32, 32)


def test_a_resumed_device_images_run_equals_an_uninterrupted_one(tiny_data, tiny_backbone, tmp_path):
    """On the CPU `--device-images` keeps the images on the CPU and takes the batched path."""
    from tests.test_checkpoint import _strip, _train
    from tl.engine import checkpoint

    full = _train(tiny_data, tmp_path / "full", 3, "--device-images")
    half = _train(tiny_data, tmp_path / "half", 1, "--device-images")
    assert main.main(["--resume", str(half / "last.ckpt"), "--epochs", "3", "--no-progress"]) == 0
    a, b = checkpoint.load_checkpoint(full / "last.ckpt"), checkpoint.load_checkpoint(half / "last.ckpt")
    assert _strip(a["history"]["rows"]) == _strip(b["history"]["rows"]) and a["epoch"] == 3
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_compile_trains_the_same_network_and_saves_the_plain_names(tiny_data, tiny_backbone, tmp_path):
    """`--compile` on the CPU (inductor needs a C++ compiler; about 50 s
    here, most of it compiling). Checkpoints keep the
    plain module's names, config.json records the option, and a resume that changes it is refused."""
    import time

    from tl import TLError
    from tl.engine import checkpoint
    from tl.engine.resume import resume_options

    started = time.perf_counter()
    # with --ema in both: the average is of the compiled network's weights, under their plain names too
    plain, compiled = _run(tiny_data, tmp_path / "a", ema=0.7), _run(tiny_data, tmp_path / "b", compile=True, ema=0.7)
    print(f"compiled run: {time.perf_counter() - started:.1f} s")
    assert compiled.config["options"]["compile"] is True and plain.config["options"]["compile"] is False
    assert compiled.model._compiled_call_impl is not None and plain.model._compiled_call_impl is None
    a, b = (checkpoint.load_state_file(r.run_dir / "best.pth") for r in (plain, compiled))
    assert list(a) == list(b)  # no "_orig_mod." prefix
    ckpt = checkpoint.load_checkpoint(compiled.run_dir / "last.ckpt")
    assert list(ckpt["model"]) == list(a)
    plain_ckpt = checkpoint.load_checkpoint(plain.run_dir / "last.ckpt")
    assert list(ckpt["ema"]) == list(plain_ckpt["ema"]) and int(ckpt["ema"]["n_averaged"]) > 1
    rows = [[r["loss"] for r in x.history.rows] for x in (plain, compiled)]
    assert all(abs(p - c) < 1e-3 for p, c in zip(*rows)), rows  # the same network, another kernel fusion
    import pytest

    with pytest.raises(TLError, match="compile False"):
        resume_options(ckpt, {"compile": False}, compiled.run_dir / "last.ckpt")


class _NoWaitWhileServing:
    """A train loader wrapped so that, from its second pass on (the first autotunes cuDNN),
    any host sync while its batches are served and trained on raises: CUDA's sync debug mode
    "error" is on from the first batch until the loader is exhausted, before the phase end's one read."""

    def __init__(self, loader):
        self.loader, self.sampler, self.passes = loader, loader.sampler, 0  # (the loop reads .sampler)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.passes += 1
        torch.cuda.set_sync_debug_mode("error" if self.passes > 1 else 0)
        try:
            yield from self.loader
        finally:
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_a_device_images_train_step_never_waits_for_the_gpu(tiny_data, tiny_backbone):
    from torch.utils.data import DataLoader

    from tl.engine.device import device_hooks
    from tl.loop import Hooks, train_model

    model, loaders = _loop_setup(tiny_data)
    train = _decoded_train(tiny_data, device="cuda")
    loaders["train"] = _NoWaitWhileServing(DataLoader(train, batch_size=5, shuffle=True, collate_fn=train.collate))
    hooks = Hooks(progress=False, log=lambda s: None, **device_hooks(torch.device("cuda")))
    history = train_model(model, loaders, torch.nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1),
                          num_epochs=3, device="cuda", hooks=hooks)
    assert loaders["train"].passes == 2 and len(history.rows) == 5
