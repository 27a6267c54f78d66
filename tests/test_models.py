"""tl/models.py: parameter groups, heads (the stacked one-logit head included), what is frozen,
the parameter table, and every listed backbone through the one loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from experiments.recipes import vgg_stacked
from tl import TLError
from tl.data import build_transforms, make_loaders
from tl.engine.options import RunOptions
from tl.engine.run import run
from tl.engine.selection import image_datasets
from tl.engine.weights import build_model
from tl.loop import Hooks, train_model
from tl.models import (
    eval_batchnorm,
    get_backbone,
    group_of,
    param_groups,
    parameter_table,
    set_trainable,
)


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


def test_stacked_one_logit_head_trains_and_matches_a_hand_computation(tiny_data, tiny_backbone, tmp_path):
    opts = RunOptions(data=tiny_data, backbone="tiny", weights="none", epochs=4, lr_scale=30, workers=0,
                      out=tmp_path, image_size=32, progress=False)
    result = run(vgg_stacked.RECIPE, vgg_stacked.build, opts, log=lambda s: None)
    model = result.model.eval()
    assert model.dense.out_features == 1 and model.pretrained_model.fc.out_features == 1000
    spec = get_backbone("tiny")
    val = image_datasets(tiny_data, build_transforms(spec.mean, spec.std, size=32, resize=37))["val"]
    x, y = map(torch.stack, zip(*((a, torch.tensor(b)) for a, b in (val[i] for i in range(len(val))))))
    with torch.no_grad():
        p = torch.sigmoid(model(x)[:, 0])  # P(class 1)
    hand_acc = ((p > 0.5).long() == y).float().mean().item()
    hand_loss = nn.functional.binary_cross_entropy(p, y.float()).item()
    best = result.history.val()[result.history.best_epoch]
    assert hand_acc == pytest.approx(best["acc"]) and hand_loss == pytest.approx(best["loss"], rel=1e-4)
    assert result.history.best_acc > 0.9
    frozen = result.model.pretrained_model.fc.weight
    assert not frozen.requires_grad


def test_one_logit_recipe_refuses_three_classes(three_class_data, tiny_backbone, tmp_path):
    opts = RunOptions(data=three_class_data, backbone="tiny", weights="none", epochs=1, workers=0, out=tmp_path,
                      image_size=32, progress=False)
    with pytest.raises(TLError, match="single-logit head, which separates exactly 2 classes"):
        run(vgg_stacked.RECIPE, vgg_stacked.build, opts, log=lambda s: None)


ZOO = ["resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "densenet121", "efficientnet_b0", "vgg19"]


@pytest.mark.parametrize("backbone", ZOO)
def test_every_listed_backbone_builds_freezes_and_steps(backbone, three_class_data):
    spec = get_backbone(backbone)
    model = build_model(backbone, 3, "none")
    groups = {group_of(n, spec) for n, _ in model.named_parameters()}
    assert groups == {"body", "neck", "head"}
    assert model.get_submodule(spec.head).out_features == 3
    set_trainable(model, spec, ["neck", "head"])
    before = {n: p.clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(param_groups(model, spec, {"neck": 1e-3, "head": 1e-2}), lr=0.01, momentum=0.9)
    sets = image_datasets(three_class_data, build_transforms(spec.mean, spec.std, size=64, resize=73),
                          max_per_class=2)
    history = train_model(model, make_loaders(sets, 6), nn.CrossEntropyLoss(), optimizer, num_epochs=2,
                          hooks=Hooks(frozen_bn_eval=True, progress=False, log=lambda s: None))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in history.rows)
    for name, p in model.named_parameters():
        if group_of(name, spec) == "body":
            assert torch.equal(before[name], p), f"frozen {name} moved"
    trained = [n for n, p in model.named_parameters() if group_of(n, spec) != "body"]
    assert any(not torch.equal(before[n], dict(model.named_parameters())[n]) for n in trained)


def test_the_batchnorm_layers_kept_in_eval_are_the_frozen_ones_or_all():
    """`eval_batchnorm` names the BatchNorm layers that stay in eval mode while the model trains:
    with `frozen_bn_eval` those whose affine parameters are all frozen (or that have none), with
    `bn_eval` every one, with neither none; the loop keeps exactly those in eval mode, so their
    running statistics stay as they were while a trainable BatchNorm's move."""
    frozen, trainable, plain = nn.BatchNorm2d(2), nn.BatchNorm2d(2), nn.BatchNorm2d(2, affine=False)
    net = nn.Sequential(nn.Conv2d(3, 2, 1), frozen, trainable, plain, nn.Flatten(), nn.LazyLinear(2))
    net(torch.randn(2, 3, 4, 4))  # materialise the lazy head
    frozen.requires_grad_(False)
    assert eval_batchnorm(net, frozen_bn_eval=True, bn_eval=False) == [frozen, plain]
    assert eval_batchnorm(net, frozen_bn_eval=False, bn_eval=True) == [frozen, trainable, plain]
    assert eval_batchnorm(net, frozen_bn_eval=False, bn_eval=False) == []
    before = {n: b.clone() for n, b in net.named_buffers()}
    data = TensorDataset(torch.randn(8, 3, 4, 4), torch.randint(0, 2, (8,)))
    loaders = {p: DataLoader(data, batch_size=4) for p in ("train", "val")}
    train_model(net, loaders, nn.CrossEntropyLoss(), torch.optim.SGD(
        [p for p in net.parameters() if p.requires_grad], lr=0.1), num_epochs=2,
        hooks=Hooks(frozen_bn_eval=True, progress=False, log=lambda s: None))
    moved = {n.split(".")[0] for n, b in net.named_buffers() if not torch.equal(b, before[n])}
    assert moved == {"2"}  # only the trainable BatchNorm updated its running statistics
