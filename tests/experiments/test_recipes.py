"""Each recipe carries its document's numbers and trains exactly the intended parameters."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from experiments import NAMES, get_experiment
from tests.conftest import require_real_data
from tl import TLError
from tl.engine.weights import build_model
from tl.models import BATCHNORM, get_backbone
from tl.recipe import Recipe
from tl.stages import as_stages

SEEDS = Path(__file__).resolve().parents[3] / "shared" / "seeds"
ROOT = Path(__file__).resolve().parents[2]

# The PyTorch tutorial "Transfer Learning for Computer Vision" (S. Chilamkurthy,
# pytorch.org/tutorials/beginner/transfer_learning_tutorial.html): optim.SGD(lr=0.001,
# momentum=0.9), lr_scheduler.StepLR(step_size=7, gamma=0.1), num_epochs=25 (all train), batch_size=4.
TUTORIAL = {"lr": 0.001, "momentum": 0.9, "step_size": 7, "gamma": 0.1, "num_epochs": 25, "batch_size": 4}
# fastai's Learner.fine_tune(epochs, base_lr=2e-3, freeze_epochs=1, lr_mult=100, pct_start=0.3, div=5.0)
# (fastai/callback/schedule.py); fit_one_cycle's div=25., div_final=1e5; its Adam: wd=0.01 (decoupled),
# betas (0.9, 0.99), eps 1e-5; DataLoaders bs=64. fine_tune has no default epoch count: 9 here (+1 frozen).
FASTAI = {"base_lr": 2e-3, "freeze_epochs": 1, "lr_mult": 100, "pct_start": 0.3, "div": 5.0, "freeze_pct_start": 0.99,
          "freeze_div": 25.0, "div_final": 1e5, "wd": 0.01, "betas": (0.9, 0.99), "eps": 1e-5, "bs": 64, "epochs": 9}


def _document(number: str) -> str:
    (path,) = require_real_data(SEEDS).glob(f"{number}_*.txt")
    return path.read_text()


def _numbers(pattern: str, text: str) -> list[float]:
    return [float(x) for x in re.findall(pattern, text)]


def _adam_default_lr() -> float:
    return torch.optim.Adam([torch.zeros(1, requires_grad=True)]).defaults["lr"]


def _from_documents(name: str):
    """(optimizer type, {group: lr}, training epochs, batch size) as the source document's
    own code states them, read from its text in ../shared/seeds (the recipe's own docstring fixes the
    numbers of 000 and 004, which give none)."""
    if name in ("resnet_scratch", "resnet_finetune"):  # 003: Adam(lr = 0.0001), batch 8, EPOCHS = 10
        doc = _document("003")
        (lr,) = set(_numbers(r"optim\.Adam\(model\.parameters\(\), lr = ([\d.]+)\)", doc))
        (epochs,) = set(_numbers(r"EPOCHS = (\d+)", doc))
        (batch,) = set(_numbers(r"batch_size = (\d+)", doc))
        return torch.optim.Adam, {"all": lr}, epochs, batch
    if name == "resnet_frozen":  # 001: Adam(params_to_update) at its default lr, num_epochs=13 (all train)
        doc = _document("001")
        assert "optim.Adam(params_to_update)" in doc
        (epochs,) = set(_numbers(r"num_epochs=(\d+)", doc))
        (batch,) = set(_numbers(r"batch_size=(\d+)", doc))
        return torch.optim.Adam, {"head": _adam_default_lr()}, epochs, batch
    if name in ("vgg_transfer", "vgg_finetune"):  # 002: num_epochs=2 counts the validation-only epoch 0
        doc = _document("002")
        (epochs,) = set(_numbers(r"num_epochs=(\d+)", doc))
        (batch,) = set(_numbers(r"batch_size=(\d+)", doc))
        if name == "vgg_transfer":
            (lr,) = _numbers(r"optim\.SGD\(params=params_to_update,lr=([\d.]+),momentum=0\.9\)", doc)
            return torch.optim.SGD, {"head": lr}, epochs - 1, batch
        lrs = _numbers(r"'lr':([\d.e-]+)", doc)  # features, classifier.0/.3, classifier.6
        return torch.optim.SGD, dict(zip(("body", "neck", "head"), lrs)), epochs - 1, batch
    if name == "resnet_bn_only":  # 000 gives no numbers: the recipe's own Adam 1e-3, batch 32, 10 epochs
        return torch.optim.Adam, {"all": 1e-3}, 10, 32
    if name == "vgg_stacked":  # 004 gives none either: 001's head-only Adam at its default lr
        return torch.optim.Adam, {"head": _adam_default_lr()}, 5, 32
    if name in ("tutorial_finetune", "tutorial_frozen"):
        lrs = {"all" if name == "tutorial_finetune" else "head": TUTORIAL["lr"]}
        return torch.optim.SGD, lrs, TUTORIAL["num_epochs"], TUTORIAL["batch_size"]
    if name == "two_stage":  # stage 2: base_lr halved, slice(base_lr/lr_mult, base_lr) spread geometrically
        base = FASTAI["base_lr"] / 2
        lrs = dict(zip(("body", "neck", "head"), (base / FASTAI["lr_mult"], base / FASTAI["lr_mult"] ** 0.5, base)))
        return torch.optim.AdamW, lrs, FASTAI["freeze_epochs"] + FASTAI["epochs"], FASTAI["bs"]
    if name == "modern_finetune":  # no document: the recipe's own choices, stated in its docstring
        return torch.optim.AdamW, {"body": 1e-4, "neck": 3e-4, "head": 1e-3}, 12, 32
    raise AssertionError(f"no document numbers for {name}")


def _build(name, backbone=None, stage=-1):
    """(model, optimizer) of a recipe's `stage` (the last by default, the only one for most)."""
    module = get_experiment(name)
    recipe = module.RECIPE
    spec = get_backbone(backbone or recipe.backbone)
    model = build_model(spec.name, 1 if recipe.loss == "bce_logit" else 2, "none", stack=recipe.stack_head)
    model, stages = as_stages(module.build(model, spec, recipe))
    return model, stages[stage].setup(model, spec, recipe)


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", NAMES)
def test_recipe_numbers_match_the_documents(name):
    recipe = get_experiment(name).RECIPE
    optimizer_type, lrs, epochs, batch = _from_documents(name)
    assert recipe.lrs == lrs and recipe.train_epochs == epochs and recipe.batch_size == batch
    assert recipe.num_epochs == epochs + 1  # the loop's count includes the epoch-0 baseline
    _, optimizer = _build(name)
    assert type(optimizer) is optimizer_type
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == lrs
    if optimizer_type is torch.optim.SGD:
        assert all(g["momentum"] == 0.9 for g in optimizer.param_groups)
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == pytest.approx(lrs, rel=1e-12)


def test_the_tutorial_recipes_step_their_rate_as_the_tutorial_does():
    for name in ("tutorial_finetune", "tutorial_frozen"):
        module = get_experiment(name)
        model = build_model("resnet18", 2, "none")
        _, _, scheduler = module.build(model, get_backbone("resnet18"), module.RECIPE)
        assert type(scheduler) is torch.optim.lr_scheduler.StepLR
        assert (scheduler.step_size, scheduler.gamma) == (TUTORIAL["step_size"], TUTORIAL["gamma"])
        assert module.RECIPE.augment == "tutorial" and not module.RECIPE.frozen_bn_eval  # model.train() everywhere
    model, _ = _build("tutorial_frozen")
    assert _trainable(model) == {"fc.weight", "fc.bias"}


def test_two_stage_is_fastais_fine_tune():
    recipe = get_experiment("two_stage").RECIPE
    assert recipe.first_epochs == FASTAI["freeze_epochs"]
    # stage 1: slice(base_lr) = base_lr for the last group, base_lr / 10 for the others
    assert recipe.first_lrs == {"body": FASTAI["base_lr"] / 10, "neck": FASTAI["base_lr"] / 10,
                                "head": FASTAI["base_lr"]}
    model, optimizer = _build("two_stage", stage=0)
    bn = {f"{m}.{p}" for m, mod in model.named_modules() if isinstance(mod, BATCHNORM) for p in ("weight", "bias")}
    assert _trainable(model) == bn | {"fc.weight", "fc.bias"}  # freeze() with train_bn=True
    for _, optimizer in (_build("two_stage", stage=0), _build("two_stage", stage=1)):
        assert type(optimizer) is torch.optim.AdamW
        assert all((g["weight_decay"], g["betas"], g["eps"]) == (FASTAI["wd"], FASTAI["betas"], FASTAI["eps"])
                   for g in optimizer.param_groups)
    module = get_experiment("two_stage")
    _, stages = as_stages(module.build(build_model("resnet18", 2, "none"), get_backbone("resnet18"), recipe))
    for stage, pct, div in zip(stages, (FASTAI["freeze_pct_start"], FASTAI["pct_start"]),
                               (FASTAI["freeze_div"], FASTAI["div"])):
        _, optimizer = _build("two_stage", stage=stages.index(stage))
        sched = stage.schedule(optimizer, 2, 10)
        lrs = []
        for _ in range(20):
            lrs.append(optimizer.param_groups[-1]["lr"])
            optimizer.step(), sched.step()
        peak = optimizer.param_groups[-1]["max_lr"]
        assert stage.interval == "step" and lrs[0] == pytest.approx(peak / div)
        # torch's peak: the last whole step before pct * total - 1 (tl.stages.one_cycle)
        assert lrs.index(max(lrs)) == int(pct * 20 - 1 + 1e-9) and lrs[-1] == pytest.approx(peak / FASTAI["div_final"])


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
    if name in ("resnet_frozen", "vgg_transfer", "tutorial_frozen"):
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


# ----------------------------------------------------------------------------- tuned_<recipe>, per backbone
def _tuned(folder, dataset: str, backbone: str, epochs: int, name: str | None = None):
    import json

    committed = ROOT / "experiments" / "tuned" / "modern_finetune-hymenoptera_data-efficientnet_lite0.json"
    tuned = json.loads(committed.read_text()) | {"dataset": dataset, "backbone": backbone}
    tuned["recipe_fields"] = tuned["recipe_fields"] | {"train_epochs": epochs, "backbone": backbone}
    path = folder / (name or f"modern_finetune-{dataset}-{backbone.replace(':', '-')}.json")
    path.write_text(json.dumps(tuned))
    return path


def test_a_tuned_recipe_takes_the_numbers_of_its_data_set_and_backbone_only(tmp_path, monkeypatch):
    from experiments import tuned_files

    monkeypatch.setenv("TL_TUNED_DIR", str(tmp_path))
    data = tmp_path / "x" / "bees"
    _tuned(tmp_path, "bees", "efficientnet_lite0", 5)
    _tuned(tmp_path, "bees", "timm:mobilenetv3_small_050", 6)
    _tuned(tmp_path, "wasps", "efficientnet_lite2", 7)
    _tuned(tmp_path, "bees", "efficientnet_lite2", 8, name="modern_finetune-bees-efficientnet_lite1.json")  # renamed
    assert set(tuned_files("modern_finetune")) == {("bees", "efficientnet_lite0"), ("wasps", "efficientnet_lite2"),
                                                  ("bees", "timm:mobilenetv3_small_050")}  # the renamed one is not
    for backbone, epochs in (("efficientnet_lite0", 5), ("timm:mobilenetv3_small_050", 6)):
        recipe = get_experiment("tuned_modern_finetune", data, backbone).RECIPE
        assert (recipe.backbone, recipe.train_epochs) == (backbone, epochs)
    wasps = get_experiment("tuned_modern_finetune", tmp_path / "wasps").RECIPE  # no -b: the one it was tuned with
    assert (wasps.backbone, wasps.train_epochs) == ("efficientnet_lite2", 7)
    assert "with efficientnet_lite2" in wasps.source
    for backbone in ("efficientnet_lite1", "efficientnet_lite2", "resnet18", "timm:resnet18"):
        with pytest.raises(TLError) as caught:
            get_experiment("tuned_modern_finetune", data, backbone)
        assert f"no numbers tuned for modern_finetune on bees with {backbone}" in str(caught.value)
        assert f"python -m experiments.tune --recipe modern_finetune --data {data} --backbone {backbone}" \
               in str(caught.value)
    with pytest.raises(TLError, match="has numbers tuned on bees for .*: name one"):
        get_experiment("tuned_modern_finetune", data)  # two backbones: which one is not guessed
    with pytest.raises(TLError, match="name the data folder"):
        get_experiment("tuned_modern_finetune")


def test_a_backbone_without_its_own_tuned_file_is_one_error_line(tmp_path, monkeypatch, capsys, tiny_data):
    import main

    monkeypatch.setenv("TL_TUNED_DIR", str(tmp_path / "tuned"))
    (tmp_path / "tuned").mkdir()
    _tuned(tmp_path / "tuned", tiny_data.name, "efficientnet_lite0", 3)
    assert main.main(["-e", "tuned_modern_finetune", "-b", "efficientnet_lite1", "--data", str(tiny_data),
                      "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: no numbers tuned for modern_finetune on {tiny_data.name} with efficientnet_lite1")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()
