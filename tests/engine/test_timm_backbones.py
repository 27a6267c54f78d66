"""tl/engine/timm_backbones.py: any timm model by name (`--backbone timm:NAME`): every parameter in
exactly one group, and a run that trains, evaluates, predicts, resumes and exports.

Small models only (timm's resnet18, convnext_atto, mobilenetv3_small_050 at 64 pixels), so
the whole file takes seconds."""

from __future__ import annotations

import json

import pytest
from torch import nn

from tests.helpers import cli
from tl.engine.backbones import backbone_spec
from tl.models import group_of, param_groups, set_trainable


# ----------------------------------------------------------------------------- timm:NAME
@pytest.mark.parametrize("arch", ["resnet18", "convnext_atto", "mobilenetv3_small_050"])
def test_a_timm_spec_puts_every_parameter_in_exactly_one_group(arch):
    spec = backbone_spec(f"timm:{arch}")
    model = spec.create()
    cfg = model.pretrained_cfg
    assert (spec.mean, spec.std, spec.image_size) == (tuple(cfg["mean"]), tuple(cfg["std"]), cfg["input_size"][-1])
    groups = {}
    for name, _ in model.named_parameters():
        groups.setdefault(group_of(name, spec), []).append(name)
    assert groups["head"] == [f"{spec.head}.weight", f"{spec.head}.bias"]  # the final Linear alone
    assert isinstance(model.get_submodule(spec.head), nn.Linear) and groups["body"] and groups["neck"]
    set_trainable(model, spec, ["body", "neck", "head"])
    handed = [id(p) for g in param_groups(model, spec, {"body": 1e-4, "neck": 3e-4, "head": 1e-3}) for p in g["params"]]
    assert sorted(handed) == sorted(id(p) for p in model.parameters())  # each once, none left out
    if arch == "convnext_atto":  # its `head` module holds a LayerNorm before the Linear: that is neck
        assert spec.head == "head.fc" and group_of("head.norm.weight", spec) == "neck"
        assert all(n.startswith(("stages.3.", "head.norm.")) for n in groups["neck"])


def test_a_timm_backbone_runs_end_to_end_and_its_run_evaluates_predicts_resumes_and_exports(
        tiny_data, tmp_path, capsys, own_cache_dir):
    from experiments.recipes import resnet_frozen
    from tl.engine.options import RunOptions
    from tl.engine.run import run as train

    opts = RunOptions(data=tiny_data, backbone="timm:mobilenetv3_small_050", weights="none", out=tmp_path / "runs",
                      plots=False, progress=False)  # (no pictures: seconds saved)
    opts.make_quick()
    lines = []
    run = train(resnet_frozen.RECIPE, resnet_frozen.build, opts, log=lines.append).run_dir
    assert any(line.startswith("feature cache: val only") for line in lines)  # the cut at `classifier` is exact
    assert run.name.startswith("resnet_frozen-timm-mobilenetv3_small_050-")  # no colon in a folder name
    config = json.loads((run / "config.json").read_text())
    assert config["recipe"]["backbone"] == "timm:mobilenetv3_small_050" and config["options"]["image_size"] == 64
    assert cli(capsys, "--evaluate", run / "best.pth", "--data", tiny_data)[0] == 0
    photo = next((tiny_data / "val" / "class_0").iterdir())
    code, out, _ = cli(capsys, "--predict", photo, "--checkpoint", run / "best.pth")
    assert code == 0 and out.startswith(f"{photo}: class_")
    assert cli(capsys, "--resume", run / "last.ckpt", "--epochs", "2", "--no-progress")[0] == 0
    assert json.loads((run / "config.json").read_text())["resumed"]
    assert cli(capsys, "--export", run, "--format", "torchscript")[0] == 0
    code, out, _ = cli(capsys, "--predict", photo, "--checkpoint", run / "model.pt")
    assert code == 0 and out.startswith(f"{photo}: class_")
