"""tl/engine/image_cache.py: decoded images kept in memory or on the training device
(`--image-cache`, `--device-images`). The train batch of --device-images is augmented at once
(`BatchedCrops`) with the very crop boxes and flips of the per-image path; pipelines that draw
their own numbers stay per image. The GPU tests run only where CUDA is visible."""

import pytest
import torch

from experiments import get_experiment
from tests.helpers import loop_setup
from tl.data import build_transforms
from tl.engine import stage_setup
from tl.engine.image_cache import DecodedImages
from tl.engine.options import RunOptions
from tl.engine.run import run
from tl.engine.selection import image_datasets


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

    model, loaders = loop_setup(tiny_data)
    train = _decoded_train(tiny_data, device="cuda")
    loaders["train"] = _NoWaitWhileServing(DataLoader(train, batch_size=5, shuffle=True, collate_fn=train.collate))
    hooks = Hooks(progress=False, log=lambda s: None, **device_hooks(torch.device("cuda")))
    history = train_model(model, loaders, torch.nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1),
                          num_epochs=3, device="cuda", hooks=hooks)
    assert loaders["train"].passes == 2 and len(history.rows) == 5


def _run_finetune(data, out, **options):
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
    a = _run_finetune(tiny_data, tmp_path / "a", image_cache=True, workers=0, device="cpu")
    # asked for 2 workers: images on the device are transformed in the main process regardless
    b = _run_finetune(tiny_data, tmp_path / "b", device_images=True, workers=2, device="cpu")
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_images_and_their_augmentation_stay_there(tiny_data, tiny_backbone, tmp_path, monkeypatch):
    devices = []
    real = DecodedImages.__getitem__

    def spy(self, i):
        image, label = real(self, i)
        devices.append(image.device.type)
        return image, label

    monkeypatch.setattr(DecodedImages, "__getitem__", spy)
    result = _run_finetune(tiny_data, tmp_path, device_images=True, device="cuda")
    assert set(devices) == {"cuda"}
    assert [r["epoch"] for r in result.history.val()] == [0, 1, 2]


@pytest.mark.usefixtures("own_cache_dir")
def test_decoded_image_cache_gives_the_same_val_tensors(tiny_data):
    t = build_transforms((0.5,) * 3, (0.5,) * 3, size=32, resize=36)
    sets = image_datasets(tiny_data, t)
    decoded = DecodedImages(sets["val"], resize=36)
    for i in range(len(decoded)):
        assert torch.equal(decoded[i][0], sets["val"][i][0])
        assert decoded[i][1] == sets["val"][i][1]
    assert DecodedImages(sets["train"], resize=36)[0][0].shape == (3, 32, 32)


