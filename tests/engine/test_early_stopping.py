"""tl/engine/early_stopping.py: --patience stops a run on a plateau and keeps the best epoch's
weights."""

from __future__ import annotations

import torch

from experiments.recipes import resnet_frozen
from tl.engine.options import RunOptions
from tl.engine.run import run


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
