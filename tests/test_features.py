"""Feature and image caches: exact where they claim to be, rebuilt when their inputs change."""

from __future__ import annotations

import os

import pytest
import torch

from experiments.recipes import resnet_frozen, resnet_scratch
from tl import features
from tl.data import build_transforms
from tl.engine.image_cache import DecodedImages
from tl.engine.options import RunOptions
from tl.engine.run import run
from tl.engine.selection import image_datasets


@pytest.fixture(autouse=True)
def own_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TL_CACHE_DIR", str(tmp_path / "feature-cache"))
    return tmp_path / "feature-cache"


def _frozen(data, out, **kw):
    kw = {"workers": 0, **kw}
    opts = RunOptions(data=data, backbone="tiny", weights="none", epochs=4, out=out, image_size=32,
                      progress=False, lr_scale=10, **kw)
    return run(resnet_frozen.RECIPE, resnet_frozen.build, opts, log=lambda s: None)


def test_cached_training_equals_uncached_without_augmentation(tiny_data, tiny_backbone, tmp_path):
    cached = _frozen(tiny_data, tmp_path / "a", augment=False, workers=2)  # the cached loaders need no workers
    plain = _frozen(tiny_data, tmp_path / "b", augment=False, feature_cache=False, workers=2)
    assert cached.config["feature_cache"] == "train + val (exact: no augmentation)"
    assert plain.config["feature_cache"] == "off"
    for a, b in zip(cached.history.rows, plain.history.rows):
        assert (a["epoch"], a["phase"]) == (b["epoch"], b["phase"])
        assert a["acc"] == b["acc"] and a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert torch.allclose(cached.model.fc.weight, plain.model.fc.weight, atol=1e-5)
    for name, tensor in plain.model.state_dict().items():  # the frozen part is identical
        if not name.startswith("fc."):
            assert torch.equal(tensor, cached.model.state_dict()[name]), name


def test_with_augmentation_only_val_is_cached_and_val_stays_exact(tiny_data, tiny_backbone, tmp_path):
    cached = _frozen(tiny_data, tmp_path / "a")
    plain = _frozen(tiny_data, tmp_path / "b", feature_cache=False)
    assert cached.config["feature_cache"].startswith("val only")
    assert cached.history.rows[0]["loss"] == pytest.approx(plain.history.rows[0]["loss"], abs=1e-5)
    views = _frozen(tiny_data, tmp_path / "c", cache_views=3)
    assert "3 precomputed augmented views" in views.config["feature_cache"]
    # the views change only train's inputs: val, scored on its exact cached features, starts where the uncached run does
    assert views.history.rows[0]["loss"] == pytest.approx(plain.history.rows[0]["loss"], abs=1e-5)
    assert views.history.rows[0]["acc"] == plain.history.rows[0]["acc"]


def test_recipes_that_train_the_body_are_not_cached(tiny_data, tiny_backbone, tmp_path):
    opts = RunOptions(data=tiny_data, backbone="tiny", epochs=1, workers=0, out=tmp_path, image_size=32,
                      progress=False)
    result = run(resnet_scratch.RECIPE, resnet_scratch.build, opts, log=lambda s: None)
    assert result.config["feature_cache"].startswith("off (parameters before the cut point fc train")


def test_cache_is_reused_and_rebuilt_when_images_or_weights_change(tiny_data, tiny_backbone, tmp_path,
                                                                    own_cache_dir):
    _frozen(tiny_data, tmp_path / "a", augment=False)
    first = sorted(own_cache_dir.iterdir())
    assert len(first) == 2  # train and val
    _frozen(tiny_data, tmp_path / "b", augment=False)
    assert sorted(own_cache_dir.iterdir()) == first  # same images, same weights: reused
    image = tiny_data / "val" / "class_0" / "000.png"
    os.utime(image, ns=(0, 0))  # an edited image
    _frozen(tiny_data, tmp_path / "c", augment=False)
    assert len(list(own_cache_dir.iterdir())) == 3  # val rebuilt, train reused
    _frozen(tiny_data, tmp_path / "d", augment=False, seed=7)  # other random init = other backbone weights
    assert len(list(own_cache_dir.iterdir())) == 5


def test_folding_batchnorm_gives_the_same_outputs_and_leaves_the_model_alone(tiny_backbone):
    from tests.conftest import TinyNet

    torch.manual_seed(0)
    model = TinyNet().eval()
    for bn in (model.stem[1], model.block[1]):  # statistics far from the fresh 0 / 1
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.2, 3), bn.weight.data.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = features.fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    assert isinstance(model.stem[1], torch.nn.BatchNorm2d)
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    assert features.fold_batchnorm(plain) is plain  # nothing to fold, nothing copied


def test_forward_to_gives_the_cuts_input_and_runs_nothing_from_the_cut_on():
    from tests.conftest import TinyNet

    torch.manual_seed(0)
    model = TinyNet().eval()
    ran = []
    model.fc.register_forward_hook(lambda module, inputs, output: ran.append(module))
    x = torch.randn(2, 3, 32, 32)
    got = features.forward_to(model, "fc", x)
    assert not ran  # the forward pass stopped at the cut: the tail did not run
    assert not model.fc._forward_pre_hooks  # and the stopping hook is gone
    with torch.no_grad():
        assert torch.equal(got, model.pool(model.block(model.stem(x))).flatten(1))


def test_vgg_cut_keeps_dropout_in_the_tail():
    from tl.engine.weights import build_model
    from tl.models import get_backbone

    spec = get_backbone("vgg16")
    model = build_model("vgg16", 2, "none")
    split = features.split_at_cut(model, spec)
    assert [type(m).__name__ for m in split.tail] == ["Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert split.tail[-1] is model.classifier[6]


def test_decoded_image_cache_gives_the_same_val_tensors(tiny_data):
    t = build_transforms((0.5,) * 3, (0.5,) * 3, size=32, resize=36)
    sets = image_datasets(tiny_data, t)
    decoded = DecodedImages(sets["val"], resize=36)
    for i in range(len(decoded)):
        assert torch.equal(decoded[i][0], sets["val"][i][0])
        assert decoded[i][1] == sets["val"][i][1]
    assert DecodedImages(sets["train"], resize=36)[0][0].shape == (3, 32, 32)
