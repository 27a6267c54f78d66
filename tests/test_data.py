"""tl/data.py: the transforms (shapes, normalisation, val's resize and centre crop, the test split
transformed like val) and the loaders' deterministic shuffle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import write_image_folder
from tl.data import build_transforms, make_loaders
from tl.engine.selection import image_datasets

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def test_transforms_shapes_and_normalisation():
    t = build_transforms(MEAN, STD)
    img = Image.fromarray(np.full((300, 400, 3), 255, np.uint8))
    val = t["val"](img)
    assert val.shape == (3, 224, 224) and val.dtype == torch.float32
    assert torch.allclose(val, torch.ones_like(val))  # white -> (1 - 0.5) / 0.5
    assert t["train"](img).shape == (3, 224, 224)
    noaug = build_transforms(MEAN, STD, augment=False)
    assert torch.equal(noaug["train"](img), noaug["val"](img))


def test_val_transform_resizes_shorter_side_then_crops_centre():
    # a 512x256 image whose left and right quarters are black: after Resize(256) it stays
    # 512x256, the central 224 crop sees only the white middle. (003's crop-then-resize would not.)
    pixels = np.zeros((256, 512, 3), np.uint8)
    pixels[:, 128:384] = 255
    out = build_transforms((0, 0, 0), (1, 1, 1))["val"](Image.fromarray(pixels))
    assert out.min().item() == pytest.approx(1.0)


def test_max_per_class_and_deterministic_shuffle(tiny_data):
    t = build_transforms(MEAN, STD, size=32, resize=36, augment=False)
    sets = image_datasets(tiny_data, t, max_per_class=3)
    assert sorted(sets["train"].targets) == [0, 0, 0, 1, 1, 1]

    def order(seed):  # the indices the train loader draws in its first two epochs
        loader = make_loaders(sets, 2, seed=seed)["train"]
        return [list(loader.batch_sampler), list(loader.batch_sampler)]

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert order(1)[0] != order(1)[1]  # reshuffled every epoch
    assert len(sets["val"]) == 6


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.mark.parametrize("policy", ["standard", "strong"])
def test_the_test_split_is_transformed_like_val(tmp_path, policy):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, size=(48, 40, 3), dtype=np.uint8))
    transforms = build_transforms(IMAGENET_MEAN, IMAGENET_STD, size=32, augment=True, policy=policy)
    torch.manual_seed(0)
    val = transforms["val"](image)
    first, second = transforms["test"](image), transforms["test"](image)
    assert torch.equal(first, second) and torch.equal(first, val)

    # and the test data set of a data folder gets that transform
    root = write_image_folder(tmp_path / "data", train=2, val=1, size=40, phases=("train", "val", "test"))
    sets = image_datasets(root, transforms, phases=("train", "val", "test"))
    path, _ = sets["test"].samples[0]
    with Image.open(path) as img:
        expected = transforms["val"](img.convert("RGB"))
    first, second = sets["test"][0][0], sets["test"][0][0]  # two reads of one test image: no random crop
    assert torch.equal(first, expected) and torch.equal(second, expected)




@pytest.mark.parametrize("policy, scale, trivial", [("standard", (0.5, 1.0), False),
                                                    ("tutorial", (0.08, 1.0), False),
                                                    ("strong", (0.08, 1.0), True)])
def test_each_policy_crops_the_area_its_docstring_says(policy, scale, trivial):
    """build_transforms' policies: standard crops 50-100% of the image (002), tutorial 8-100%
    (torchvision's default), strong that crop and TrivialAugmentWide; val never crops at random."""
    from torchvision.transforms import v2

    t = build_transforms(MEAN, STD, policy=policy)
    crops = [m for m in t["train"].transforms if isinstance(m, v2.RandomResizedCrop)]
    assert [tuple(c.scale) for c in crops] == [scale]
    assert any(isinstance(m, v2.TrivialAugmentWide) for m in t["train"].transforms) == trivial
    assert not any(isinstance(m, (v2.RandomResizedCrop, v2.TrivialAugmentWide)) for m in t["val"].transforms)
