"""tl/features.py: the feature cache is exact where it claims to be and rebuilt when its inputs
change; cacheability is tried, not looked up; the forward to the cut leaves the model alone;
cached views are drawn more than one per image."""

from __future__ import annotations

import os

import pytest
import torch

from experiments.recipes import resnet_frozen, resnet_scratch
from tests.conftest import TinyNet
from tests.helpers import frozen_tiny
from tl import features
from tl.data import make_loaders
from tl.engine.options import RunOptions
from tl.engine.run import run
from tl.features import CacheSplit, why_not_cacheable
from tl.models import get_backbone


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


def test_training_on_cached_views_draws_more_than_one_view_per_image():
    views, n = 3, 6
    stored = torch.arange(views, dtype=torch.float32).view(views, 1, 1).expand(views, n, 2).contiguous()
    fs = features.FeatureSet(stored, torch.zeros(n, dtype=torch.long))  # stored[v, i] == v
    loaders = make_loaders({"train": fs}, batch_size=n, seed=0)
    drawn: list[int] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for _epoch in range(6):
            for x, _ in loaders["train"]:
                drawn += x[:, 0].long().tolist()
    assert len(drawn) == 6 * n and set(drawn) <= set(range(views))
    assert len(set(drawn)) > 1, "every epoch trained on the same view of every image: K does nothing"


class Noisy(torch.nn.Module):
    """A module no list of module types knows: adds noise in train mode only."""

    def forward(self, x):
        return x + torch.randn_like(x) if self.training else x


@pytest.mark.parametrize("module, cacheable", [
    (None, True), (torch.nn.Dropout(0.0), True), (torch.nn.Identity(), True),
    (torch.nn.Dropout2d(0.2), False), (torch.nn.AlphaDropout(0.2), False), (Noisy(), False),
])
def test_cacheability_is_tried_not_looked_up(tiny_backbone, module, cacheable):
    from torchvision.ops import StochasticDepth  # noqa: F401  (torchvision's efficientnet_b0 uses it)

    net = frozen_tiny(module)
    split = features.split_at_cut(net, get_backbone("tiny"))
    probe = torch.randn(4, 3, 32, 32)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    reason = features.why_not_cacheable(net, split, frozen_bn_eval=True, probe=probe)
    assert (reason is None) == cacheable, reason
    assert torch.equal(torch.get_rng_state(), rng)  # the probe draws nothing from the run's RNG
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert net.training  # mode restored


def test_batchnorm_in_train_mode_and_stochastic_depth_are_not_cached(tiny_backbone):
    from torchvision.ops import StochasticDepth

    net = frozen_tiny()
    split = features.split_at_cut(net, get_backbone("tiny"))
    probe = torch.randn(4, 3, 32, 32)
    reason = features.why_not_cacheable(net, split, frozen_bn_eval=False, probe=probe)
    assert reason is not None and "running_mean" in reason
    assert all(torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean)) for bn in (net.stem[1], net.block[1]))
    net = frozen_tiny(StochasticDepth(0.5, "row"))
    assert features.why_not_cacheable(net, split, frozen_bn_eval=True, probe=probe) is not None


def test_torchvision_efficientnet_with_stochastic_depth_trains_uncached(tiny_data, tmp_path):
    from experiments.recipes import resnet_frozen
    from tl.engine.options import RunOptions
    from tl.engine.run import run

    opts = RunOptions(data=tiny_data, backbone="efficientnet_b0", weights="none", epochs=1, workers=0,
                      out=tmp_path, image_size=32, progress=False, plots=False)
    result = run(resnet_frozen.RECIPE, resnet_frozen.build, opts, log=lambda s: None)
    assert result.config["feature_cache"].startswith("off (the layers before classifier compute something else")


def test_a_layer_after_the_cut_turns_the_feature_cache_off():
    class Rescaled(TinyNet):  # something runs after the final Linear: its input is not the model's last step
        def forward(self, x):
            return super().forward(x) * 2

    probe = torch.rand(2, 3, 32, 32)
    for net, reason in ((TinyNet(), None), (Rescaled(), "computes more after fc")):
        net.requires_grad_(False)
        why = why_not_cacheable(net, CacheSplit(net.fc, "fc"), frozen_bn_eval=True, probe=probe)
        assert why is None if reason is None else reason in why


