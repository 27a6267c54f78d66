"""`python main.py --list`: every recipe, the README's table, and which backbones run offline."""

from __future__ import annotations

import main


def test_list_names_every_recipe(capsys):
    assert main.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in ("resnet_scratch", "resnet_finetune", "resnet_frozen", "resnet_bn_only", "vgg_transfer",
                 "vgg_finetune", "efficientnet_lite0"):
        assert name in out


def test_list_prints_the_readme_table_and_what_runs_offline(capsys):
    # a cached torchvision file counts as offline; conftest's TORCH_HOME is an empty temporary folder
    from tl.engine.weights import torchvision_weights_file

    cached = torchvision_weights_file("resnet18")[1]
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert main.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "resnet18, random init" in out and "vgg16, ImageNet" in out
    assert "command: python main.py -e vgg_finetune" in out and "trains:" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert lines["efficientnet_lite0"].split()[1] == "yes:" and lines["resnet18"].split()[1] == "yes:"
    assert lines["vgg16"].split()[1] == "no:" and "vgg16-397923af.pth" in lines["vgg16"]
