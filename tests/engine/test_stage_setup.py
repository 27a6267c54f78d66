"""tl/engine/stage_setup.py: a stage says its image cache lines before its feature cache line."""

from __future__ import annotations

from experiments import get_experiment
from tl.engine.options import RunOptions
from tl.engine.run import run


def test_an_image_cache_speaks_before_the_feature_cache_line(tiny_data, tiny_backbone, tmp_path, own_cache_dir):
    """A stage says its --image-cache lines (over the limit here; on a GPU --device-images always
    says where its images are), then "feature cache: ..."."""
    module, logs = get_experiment("resnet_finetune"), []
    opts = RunOptions(data=tiny_data, backbone="tiny", weights="none", epochs=1, workers=0, out=tmp_path,
                      image_size=32, image_cache=True, cache_limit_gb=1e-9, plots=False, progress=False)
    run(module.RECIPE, module.build, opts, log=logs.append)
    said = [line.split(" for ")[0].split(":")[0] for line in logs if line.startswith(("image cache", "feature cache"))]
    assert said == ["image cache", "image cache", "feature cache"]
