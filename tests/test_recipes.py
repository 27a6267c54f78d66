"""Each recipe carries its document's numbers and trains exactly the intended parameters."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from experiments import NAMES, get_experiment
from tl import TLError
from tl.models import BATCHNORM, create_model, get_backbone
from tl.recipe import Recipe

# document numbers: optimizer, {group: lr}, training epochs (baseline excluded), batch size
DOCUMENTS = {
    "resnet_scratch": (torch.optim.Adam, {"all": 1e-4}, 10, 8),
    "resnet_finetune": (torch.optim.Adam, {"all": 1e-4}, 10, 8),
    "resnet_frozen": (torch.optim.Adam, {"head": 1e-3}, 13, 32),
    "resnet_bn_only": (torch.optim.Adam, {"all": 1e-3}, 10, 32),
    "vgg_transfer": (torch.optim.SGD, {"head": 1e-3}, 1, 32),
    "vgg_finetune": (torch.optim.SGD, {"body": 1e-4, "neck": 5e-4, "head": 1e-3}, 1, 32),
    "vgg_stacked": (torch.optim.Adam, {"head": 1e-3}, 5, 32),  # 004 gives none of these numbers
}


def _build(name, backbone=None):
    module = get_experiment(name)
    recipe = module.RECIPE
    spec = get_backbone(backbone or recipe.backbone)
    model = create_model(spec.name, 1 if recipe.loss == "bce_logit" else 2, "none", stack=recipe.stack_head)
    return module.build(model, spec, recipe)


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", NAMES)
def test_recipe_numbers_match_the_documents(name):
    recipe = get_experiment(name).RECIPE
    optimizer_type, lrs, epochs, batch = DOCUMENTS[name]
    assert recipe.lrs == lrs and recipe.train_epochs == epochs and recipe.batch_size == batch
    assert recipe.num_epochs == epochs + 1  # the loop's count includes the epoch-0 baseline
    _, optimizer = _build(name)
    assert type(optimizer) is optimizer_type
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == lrs
    if optimizer_type is torch.optim.SGD:
        assert all(g["momentum"] == 0.9 for g in optimizer.param_groups)


def test_vgg_finetune_groups_hold_the_documents_layers():
    model, optimizer = _build("vgg_finetune")
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: {names[id(p)].rsplit(".", 1)[0] for p in g["params"]} for g in optimizer.param_groups}
    assert all(n.startswith("features.") for n in groups["body"]) and len(groups["body"]) == 13
    assert groups["neck"] == {"classifier.0", "classifier.3"}
    assert groups["head"] == {"classifier.6"}
    assert _trainable(model) == set(names.values())


def test_frozen_and_transfer_recipes_train_only_the_head():
    model, optimizer = _build("resnet_frozen")
    assert _trainable(model) == {"fc.weight", "fc.bias"}
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == 1026
    model, _ = _build("vgg_transfer")
    assert _trainable(model) == {"classifier.6.weight", "classifier.6.bias"}


def test_bn_only_trains_batchnorm_and_head():
    model, optimizer = _build("resnet_bn_only")
    bn = {f"{m}.{p}" for m, mod in model.named_modules() if isinstance(mod, BATCHNORM) for p in ("weight", "bias")}
    assert _trainable(model) == bn | {"fc.weight", "fc.bias"}
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == 9600 + 1026


def test_scratch_and_finetune_train_everything():
    for name in ("resnet_scratch", "resnet_finetune"):
        model, _ = _build(name)
        assert _trainable(model) == {n for n, _ in model.named_parameters()}
    assert get_experiment("resnet_scratch").RECIPE.weights == "none"
    assert get_experiment("resnet_finetune").RECIPE.weights == "imagenet"


@pytest.mark.parametrize("name", NAMES)
def test_strategy_survives_a_backbone_swap(name):
    model, optimizer = _build(name, "efficientnet_lite0")
    trainable = _trainable(model)
    head = {"classifier.weight", "classifier.bias"}
    if name in ("resnet_frozen", "vgg_transfer"):
        assert trainable == head
    elif name == "vgg_stacked":
        assert trainable == {"dense.weight", "dense.bias"} and model.dense.in_features == 1000
    elif name == "resnet_bn_only":
        assert head < trainable and all(".bn" in n or n.startswith(("bn", "classifier")) for n in trainable)
    else:
        assert trainable == {n for n, _ in model.named_parameters()}
    assert {g["name"] for g in optimizer.param_groups} == set(get_experiment(name).RECIPE.lrs)


def test_unknown_names_and_fields_are_errors():
    with pytest.raises(TLError, match="unknown experiment"):
        get_experiment("resnet_fancy")
    with pytest.raises(TypeError):
        Recipe(name="x", source="y", strategy="z", learning_rate=1)  # an unknown key is an error
    with pytest.raises(TypeError):
        dataclasses.replace(get_experiment("vgg_finetune").RECIPE, epochs=3)
