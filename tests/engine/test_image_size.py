"""tl/engine/image_size.py: a network that cannot take, or cannot see, `--image-size` pixels is
refused before training, with the smallest larger size at which it works; one that can is
left exactly as it was."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from PIL import Image
from torch import nn

import main
from tests.conftest import TinyNet, write_image_folder
from tl import TLError
from tl.data import build_transforms
from tl.engine.image_size import check_image_size
from tl.engine.selection import image_datasets
from tl.engine.weights import build_model
from tl.models import BACKBONES, Backbone, get_backbone


class BlindBelow(TinyNet):
    """TinyNet whose features are zero for inputs smaller than `SIGHT` pixels (as ReLU6 leaves
    EfficientNet-Lite's at 24 and 32), or, with `CONSTANT`, the same non-zero vector for every photo."""

    SIGHT, CONSTANT = 24, False

    def forward(self, x):
        features = self.pool(self.block(self.stem(x))).flatten(1)
        if x.shape[-1] < self.SIGHT:
            features = torch.ones_like(features) if self.CONSTANT else features * 0
        return self.fc(features)


class ConstantBelow32(BlindBelow):
    SIGHT, CONSTANT = 32, True


class WideKernelNet(TinyNet):
    """A first layer of 20-pixel kernels without padding: it cannot take 16-pixel images."""

    def __init__(self):
        super().__init__()
        self.stem[0] = nn.Conv2d(3, 8, 20)


def _val(data, size: int):
    spec = get_backbone("tiny")
    return image_datasets(data, build_transforms(spec.mean, spec.std, size=size, augment=False))["val"]


def _register(monkeypatch, net) -> Backbone:
    spec = Backbone("tiny", net, head="fc", neck=("block",))
    monkeypatch.setitem(BACKBONES, "tiny", spec)
    return spec


@pytest.mark.parametrize("net, size, why, larger", [
    (BlindBelow, 16, "sees nothing at 16-pixel images: 12 of 12 val photos give all-zero features", 24),
    (BlindBelow, 8, "sees nothing at 8-pixel images", 24),
    (ConstantBelow32, 24, "sees nothing at 24-pixel images: 12 different val photos give identical features", 32),
    (WideKernelNet, 16, "cannot take 16-pixel images", 20),
])
def test_a_size_the_network_cannot_take_or_see_is_refused_with_one_that_works(tiny_data, monkeypatch, net, size,
                                                                              why, larger):
    spec = _register(monkeypatch, net)
    model = build_model("tiny", 2, "none")
    with pytest.raises(TLError) as exc:
        check_image_size(model, spec, "tiny", size, _val(tiny_data, size))
    assert str(exc.value).startswith(f"tiny {why}"), exc.value
    assert str(exc.value).endswith(f"is {larger} (--image-size {larger} or more)")
    check_image_size(model, spec, "tiny", larger, _val(tiny_data, larger))  # the size it names works


class DarkBlindBelow24(TinyNet):
    """TinyNet whose features are zero for dark photos only, below 24 pixels: a size at which some
    photos of a folder go blind and the others do not (as EfficientNet-Lite1 at 28 pixels)."""

    def forward(self, x):
        features = self.pool(self.block(self.stem(x))).flatten(1)
        if x.shape[-1] < 24:
            features = features * (x.mean((1, 2, 3)) > -1.5).unsqueeze(1)  # black is -2 after normalising
        return self.fc(features)


def _darken(data, indices) -> None:
    """Turn the val photos at `indices` (of the sorted val set: class_0's 20, then class_1's) black."""
    for i in indices:
        Image.new("RGB", (40, 40)).save(data / "val" / f"class_{i // 20}" / f"{i % 20:03d}.png")


# Photos off the grid of 16 that a look at every n // 16-th photo of 40 takes (0, 2, ..., 30), and
# off a spread grid of 16 (0, 2, 5, 7, ...) too, and a draw not chosen by hand.
@pytest.mark.parametrize("dark", [(1,), (39,), (3, 31, 33), (19, 21), tuple(random.Random(36).sample(range(40), 2))])
def test_a_size_at_which_a_few_photos_go_blind_is_refused(tmp_path, monkeypatch, dark):
    data = write_image_folder(tmp_path / "d", val=20)
    _darken(data, dark)
    spec = _register(monkeypatch, DarkBlindBelow24)
    model = build_model("tiny", 2, "none")
    with pytest.raises(TLError) as exc:
        check_image_size(model, spec, "tiny", 16, _val(data, 16))
    assert f"sees nothing at 16-pixel images: {len(dark)} of 40 val photos give all-zero features" in str(exc.value)
    assert str(exc.value).endswith("is 24 (--image-size 24 or more)")
    check_image_size(model, spec, "tiny", 24, _val(data, 24))


@pytest.mark.slow
def test_efficientnet_lite1_is_blind_for_some_photos_at_28_pixels(hymenoptera):
    """A size at which only some real photos go blind (24 of hymenoptera's 153 val photos for the
    packaged Lite1 weights at 28 pixels) is refused, with the smallest size that works on all."""
    spec, model = get_backbone("efficientnet_lite1"), build_model("efficientnet_lite1", 2, "imagenet")
    val = image_datasets(hymenoptera, build_transforms(spec.mean, spec.std, size=28, augment=False))["val"]
    with pytest.raises(TLError, match="sees nothing at 28-pixel images: 24 of 153 .* is 33 "):
        check_image_size(model, spec, "efficientnet_lite1", 28, val)


class NeverSees(BlindBelow):
    SIGHT = 10_000


def test_a_network_that_sees_at_no_size_names_none(tiny_data, monkeypatch):
    """Weights that give all-zero features at every size (a damaged file) are refused without a
    size that would not work either."""
    spec = _register(monkeypatch, NeverSees)
    with pytest.raises(TLError, match="and at every larger size up to 224 too: its weights see nothing"):
        check_image_size(build_model("tiny", 2, "none"), spec, "tiny", 16, _val(tiny_data, 16))


def test_a_network_that_sees_is_left_exactly_as_it_was(tiny_data, tiny_backbone):
    model = build_model(tiny_backbone, 2, "none").train()
    before, rng = copy.deepcopy(model.state_dict()), torch.get_rng_state()
    check_image_size(model, get_backbone(tiny_backbone), tiny_backbone, 32, _val(tiny_data, 32))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BatchNorm statistics too
    assert all(m.training for m in model.modules()) and torch.equal(torch.get_rng_state(), rng)


def test_a_blind_size_is_refused_by_the_command_before_any_run_folder(tiny_data, monkeypatch, tmp_path, capsys):
    _register(monkeypatch, BlindBelow)
    code = main.main(["-e", "resnet_frozen", "--data", str(tiny_data), "-b", "tiny", "--weights", "none",
                      "--quick", "--image-size", "16", "--out", str(tmp_path / "runs"), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 2 and captured.err.count("error:") == 1 and "Traceback" not in captured.err
    assert "sees nothing at 16-pixel images" in captured.err and "--image-size 24 or more" in captured.err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_efficientnet_lite0_is_blind_at_32_pixels_and_sees_at_40(hymenoptera):
    """The measured case (results/blind_sizes.md): the packaged ImageNet weights, real photos."""
    spec, model = get_backbone("efficientnet_lite0"), build_model("efficientnet_lite0", 2, "imagenet")
    val = image_datasets(hymenoptera, build_transforms(spec.mean, spec.std, size=32, augment=False))["val"]
    with pytest.raises(TLError, match="sees nothing at 32-pixel images: .* is 33 "):
        check_image_size(model, spec, "efficientnet_lite0", 32, val)
    check_image_size(model, spec, "efficientnet_lite0", 33, val)
