"""Document 004 and the wider zoo: early stopping, informative checkpoint names, the stacked
one-logit head, and every listed backbone through the one loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import main
from experiments.recipes import resnet_frozen, vgg_stacked
from tl import TLError
from tl.data import build_transforms, make_loaders
from tl.engine.evaluate import EPOCH_FILE
from tl.engine.options import RunOptions
from tl.engine.run import run
from tl.engine.selection import image_datasets
from tl.engine.weights import build_model
from tl.loop import Hooks, train_model
from tl.models import get_backbone, group_of, param_groups, set_trainable


def test_early_stopping_stops_on_a_plateau_and_keeps_the_best(tiny_data, tiny_backbone, tmp_path):
    # a learning rate far below float32 resolution: the head cannot change, val loss is flat
    opts = RunOptions(data=tiny_data, backbone="tiny", weights="none", epochs=10, lr_scale=1e-30, workers=0,
                      out=tmp_path, image_size=32, progress=False, patience=2, monitor="loss")
    result = run(resnet_frozen.RECIPE, resnet_frozen.build, opts, log=lambda s: None)
    assert result.history.best_epoch == 0 and result.history.stopped_early == 2
    assert [r["epoch"] for r in result.history.val()] == [0, 1, 2]  # not 10 epochs
    assert result.config["results"]["stopped_early"] == 2
    best = torch.load(result.run_dir / "best.pth", weights_only=True)
    for name, tensor in result.model.state_dict().items():
        assert torch.equal(tensor, best[name])


def test_informative_checkpoint_names_parse_and_evaluate_in_epoch_order(tiny_data, tiny_backbone, tmp_path):
    assert main.main(["-e", "resnet_scratch", "-b", "tiny", "--data", str(tiny_data), "--epochs", "2",
                      "--save-every-epoch", "--informative-names", "--out", str(tmp_path / "runs"),
                      "--no-progress", "--workers", "0"]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    names = sorted(p.name for p in run_dir.glob("epoch*.pth"))
    assert len(names) == 3
    m = EPOCH_FILE.match(names[1])
    assert m and int(m.group(1)) == 1 and 0 <= float(m.group(3)) <= 1
    assert EPOCH_FILE.match("07.pth").group(1) == "07" and not EPOCH_FILE.match("best.pth")
    assert main.main(["--evaluate", str(run_dir), "--data", str(tiny_data)]) == 0
    import pandas as pd

    table = pd.read_csv(run_dir / "eval_val.csv")
    assert list(table.epoch) == [0, 1, 2]
    assert table.acc.round(4).tolist() == [float(EPOCH_FILE.match(n).group(3)) for n in table.file]


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


def test_offline_message_for_the_zoo(tmp_path):
    with pytest.raises(TLError, match="densenet121-.*pth"):
        build_model("densenet121", 2, "imagenet")
