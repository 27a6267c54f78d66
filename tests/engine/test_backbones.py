"""tl/engine/backbones.py: a backbone's own input size is what a run crops at unless told, and
what --evaluate, --predict and --export read back from the run."""

from __future__ import annotations

import json

import commands
import main
from tests.conftest import TinyNet
from tl.engine.model_loading import ModelContext, context_for
from tl.models import BACKBONES, Backbone


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
