"""`--device-images`: decoded images kept on the training device and augmented there.

The point of the option is a GPU (issue "Scale out", part 4); this machine has none, so
what runs here checks the wiring on the CPU. Since issue 24 the train batch is augmented at
once (`BatchedCrops`): the same crop boxes and flips as `--image-cache --workers 0` from the
same RNG, pixels resized by another interpolation (tests/test_busy_gpu.py measures both), so
the run no longer equals that one bit for bit; its untrained baseline and its val pipeline do.
The last test runs only where CUDA is visible.
"""

import pytest
import torch

import commands
import main
from experiments import get_experiment
from tl.data import build_transforms
from tl.engine import stage_setup
from tl.engine.image_cache import DecodedImages
from tl.engine.options import RunOptions
from tl.engine.run import run
from tl.engine.selection import image_datasets


def _run(data, out, **options):
    module = get_experiment("resnet_finetune")
    opts = RunOptions(data=data, backbone="tiny", weights="none", epochs=2, batch_size=5, out=out,
                      progress=False, plots=False, **options)
    return run(module.RECIPE, module.build, opts, log=lambda s: None)


def test_device_images_on_the_cpu_augment_the_train_batch_at_once_with_the_image_caches_draws(
        tiny_data, tiny_backbone, tmp_path, monkeypatch):
    seen = []
    real = stage_setup.make_loaders

    def spy(inputs, batch_size, **kwargs):
        loaders = real(inputs, batch_size, **kwargs)
        seen.append((kwargs, {p: type(ds).__name__ for p, ds in inputs.items()}, loaders))
        return loaders

    monkeypatch.setattr(stage_setup, "make_loaders", spy)
    # device="cpu": where a GPU is visible, "auto" would put b's images there (other resize kernels)
    a = _run(tiny_data, tmp_path / "a", image_cache=True, workers=0, device="cpu")
    # asked for 2 workers: images on the device are transformed in the main process regardless
    b = _run(tiny_data, tmp_path / "b", device_images=True, workers=2, device="cpu")
    assert seen[1][0]["workers"] == 0 and seen[1][0]["pin_memory"] is False
    assert seen[1][1] == {"train": "DecodedImages", "val": "DecodedImages"}
    collate = [{p: type(loader.collate_fn).__name__ for p, loader in loaders.items()} for *_, loaders in seen]
    assert collate[1] == {"train": "BatchedCrops", "val": "function"}  # val: per image, as before
    assert collate[0] == {"train": "function", "val": "function"}  # --image-cache alone: per image
    rows_a, rows_b = a.history.rows, b.history.rows
    assert rows_a[0]["loss"] == rows_b[0]["loss"]  # the untrained baseline: the same val pipeline
    assert [r["epoch"] for r in rows_a] == [r["epoch"] for r in rows_b]
    assert abs(rows_a[-1]["loss"] - rows_b[-1]["loss"]) < 0.1  # the same crops, other interpolation
    assert b.config["options"]["device_images"] is True


def test_decoded_images_stay_on_the_device_they_are_given(tiny_data):
    sets = image_datasets(tiny_data, build_transforms((0.5,) * 3, (0.5,) * 3, size=32, resize=36))
    decoded = DecodedImages(sets["train"], resize=36, device="meta")  # a device with no data: nothing is copied back
    assert all(img.device.type == "meta" for img in decoded.images)
    assert all(img.dtype == torch.uint8 for img in decoded.images)


def test_device_images_with_workers_is_a_clear_error(tiny_data, tiny_backbone, tmp_path, capsys):
    code = main.main(["-e", "resnet_finetune", "-b", "tiny", "--data", str(tiny_data), "--out", str(tmp_path / "runs"),
                      "--device-images", "--workers", "2", "--weights", "none", "--no-progress"])
    assert code == 2
    assert "--device-images" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv, workers, image_cache", [
    ([], 2, False),
    (["--quick"], 0, False),
    (["--quick", "--workers", "1"], 1, False),  # an explicit --workers wins over --quick's 0
    (["--device-images"], 0, True),
    (["--device-images", "--workers", "0"], 0, True),
])
def test_workers_and_image_cache_from_the_command_line(tiny_data, argv, workers, image_cache):
    args = main.build_parser().parse_args(["-e", "resnet_finetune", "--data", str(tiny_data), *argv])
    opts = commands.run_options(args)
    assert (opts.workers, opts.image_cache) == (workers, image_cache)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_images_and_their_augmentation_stay_there(tiny_data, tiny_backbone, tmp_path, monkeypatch):
    devices = []
    real = DecodedImages.__getitem__

    def spy(self, i):
        image, label = real(self, i)
        devices.append(image.device.type)
        return image, label

    monkeypatch.setattr(DecodedImages, "__getitem__", spy)
    result = _run(tiny_data, tmp_path, device_images=True, device="cuda")
    assert set(devices) == {"cuda"}
    assert [r["epoch"] for r in result.history.val()] == [0, 1, 2]
