"""Stronger backbones offline (issue 23): EfficientNet-Lite1/Lite2 from their pip packages at
their own input sizes, any timm model by name (`--backbone timm:NAME`), and recipes that do
not apply to a network stopping with one clear message before training.

Small models only (timm's resnet18, convnext_atto, mobilenetv3_small_050 at 64 pixels), so
the whole file takes seconds."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from torch import nn

import commands
import main
from tests.conftest import TinyNet
from tl import TLError
from tl.engine.backbones import backbone_spec
from tl.engine.model_loading import ModelContext, context_for
from tl.engine.weights import build_model, packaged_lite_state, pair_by_position
from tl.features import CacheSplit, why_not_cacheable
from tl.models import BACKBONES, Backbone, group_of, load_into, param_groups, set_trainable


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def one_error_line(capsys, *argv) -> str:
    code, _, err = cli(capsys, *argv)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    return err


# ----------------------------------------------------------------------------- EfficientNet-Lite1 / Lite2
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


def test_a_run_crops_at_the_backbone_size_unless_told_and_its_tools_read_the_recorded_size(tiny_data, tmp_path,
                                                                                             monkeypatch):
    from experiments.recipes import resnet_finetune
    from tl.engine.options import RunOptions
    from tl.engine.run import run

    monkeypatch.setitem(BACKBONES, "tiny40", Backbone("tiny40", TinyNet, head="fc", neck=("block",), image_size=40))
    argv = ["-e", "resnet_finetune", "-b", "tiny40", "--data", str(tiny_data)]
    told = (([], None), (["--image-size", "32"], 32), (["--quick"], 64), (["--quick", "--image-size", "32"], 32))
    for more, size in told:  # None: the backbone's own, resolved when the run begins
        assert commands.run_options(main.build_parser().parse_args([*argv, *more])).image_size == size, more
    runs = {}
    for size in (None, 32):
        opts = RunOptions(data=tiny_data, backbone="tiny40", weights="none", epochs=1, max_per_class=4, workers=0,
                          out=tmp_path / str(size), image_size=size, plots=False, progress=False)
        runs[size] = run(resnet_finetune.RECIPE, resnet_finetune.build, opts, log=lambda line: None).run_dir
    assert json.loads((runs[None] / "config.json").read_text())["options"]["image_size"] == 40
    assert context_for(runs[None] / "best.pth", None).image_size == 40  # what --evaluate/--predict/--export use
    assert context_for(runs[32] / "best.pth", None).image_size == 32
    # without a config.json, the backbone's own size: a Lite2 model is looked at with 260-pixel crops
    assert ModelContext(backbone="efficientnet_lite2", classes=None).image_size == 260


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


def test_a_layer_after_the_cut_turns_the_feature_cache_off():
    class Rescaled(TinyNet):  # something runs after the final Linear: its input is not the model's last step
        def forward(self, x):
            return super().forward(x) * 2

    probe = torch.rand(2, 3, 32, 32)
    for net, reason in ((TinyNet(), None), (Rescaled(), "computes more after fc")):
        net.requires_grad_(False)
        why = why_not_cacheable(net, CacheSplit(net.fc, "fc"), frozen_bn_eval=True, probe=probe)
        assert why is None if reason is None else reason in why


# ----------------------------------------------------------------------------- bad input: one line, exit 2
def test_an_unknown_timm_model_is_one_message(capsys):
    err = one_error_line(capsys, "-e", "resnet_frozen", "-b", "timm:no_such_model", "--weights", "none")
    assert "timm has no model 'no_such_model'" in err


def test_a_weights_file_of_another_timm_model_is_one_message(tiny_data, tmp_path, capsys):
    torch.save(timm.create_model("mobilenetv3_small_050").state_dict(), tmp_path / "other.pth")
    code, _, err = cli(capsys, "-e", "resnet_frozen", "-b", "timm:resnet18", "--weights", tmp_path / "other.pth",
                       "--data", tiny_data, "--quick", "--no-progress", "--out", tmp_path / "runs")
    assert code == 2 and err.startswith(f"error: --weights {tmp_path / 'other.pth'} does not fit this model")
    assert "saved from another architecture (check --backbone)" in err


def test_batchnorm_only_training_on_a_network_without_batchnorm_stops_before_training(tiny_data, tmp_path, capsys):
    code, out, err = cli(capsys, "-e", "resnet_bn_only", "-b", "timm:convnext_atto", "--weights", "none",
                         "--data", tiny_data, "--quick", "--no-progress", "--out", tmp_path / "runs")
    assert code == 2 and err.startswith("error: resnet_bn_only trains the BatchNorm layers")
    assert "timm:convnext_atto has no BatchNorm layer" in err and len(err.strip().splitlines()) == 1
    assert "epoch" not in out.lower()
