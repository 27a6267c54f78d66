"""Review of the core split (issue 21), whose promise is no behaviour change: each test holds
the new code to what the code before the split (commit 8918d7a) printed, wrote or accepted,
or to what a new piece of the split says it does. Each was seen to fail before its fix."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

import main
from experiments import get_experiment
from tests.conftest import write_image_folder
from tests.fixtures.make_tiny_run import DATA, RUN
from tl import TLError
from tl.engine import checkpoint, files
from tl.engine.evaluate import split_loader
from tl.engine.model_loading import ModelContext, context_for
from tl.engine.options import RunOptions
from tl.engine.run import resume_run, run
from tl.loop import Hooks, train_model


def _tiny_loaders() -> dict:
    torch.manual_seed(0)
    x = torch.randn(16, 4)
    ds = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())
    return {phase: torch.utils.data.DataLoader(ds, batch_size=4) for phase in ("train", "val")}


def _train(epochs: int, **hooks) -> tuple:
    net, logs = nn.Linear(4, 2), []
    history = train_model(net, _tiny_loaders(), nn.CrossEntropyLoss(), torch.optim.SGD(net.parameters(), lr=0.1),
                          epochs, hooks=Hooks(progress=False, log=logs.append, **hooks))
    return history, logs


def test_early_stopping_prints_the_line_it_printed_before_the_split():
    """--patience's stop is announced as before the split (a stdout line of the command line)."""
    history, logs = _train(5, end_of_epoch=lambda epoch, hist: epoch == 2)
    assert history.stopped_early == 2
    assert logs[-1] == "stopping after epoch 2 (requested by the epoch-end callback)"


def test_after_step_returning_true_stops_training():
    """Hooks.after_step: "True stops". The train phase's request must survive the val phase of
    the same epoch (it was overwritten by val's run_phase, so training went on to the end)."""
    history, logs = _train(4, after_step=lambda epoch: True)
    assert history.stopped_early == 1
    assert [(r["epoch"], r["phase"]) for r in history.rows] == [(0, "val"), (1, "train"), (1, "val")]
    assert logs[-1] == "stopping after epoch 1 (requested by after_step)"


def test_a_refused_resume_says_nothing_before_its_error(tmp_path, tiny_backbone, own_cache_dir):
    """--resume on other data: the refusal is the only thing printed, as before the split (the
    recipe line came first: it was logged when the model was built, before the checks)."""
    shutil.copytree(RUN, tmp_path / "run")
    three = write_image_folder(tmp_path / "three", classes=3, train=2, val=2, size=16)
    logs = []
    with pytest.raises(TLError, match="was trained on classes"):
        resume_run(tmp_path / "run" / "last.ckpt", {"data": three, "epochs": 2}, get_experiment, log=logs.append)
    assert logs == []


def test_evaluating_val_of_a_val_split_run_reports_the_broken_files(tmp_path, tiny_backbone):
    """--evaluate (and --export's check) of a --val-split run rebuild its split of one folder:
    the files that scan left out are reported for --split val too, not only for train."""
    flat = write_image_folder(tmp_path / "d", train=8, size=16, phases=("train",)) / "train"
    (flat / "class_1" / "broken.png").write_bytes(b"not an image")
    ctx = ModelContext(backbone="tiny", classes=["class_0", "class_1"], image_size=32, val_split=0.25)
    for split in ("train", "val"):
        logs = []
        split_loader(flat, split, ctx, log=logs.append)
        assert len(logs) == 1 and "skipped 1 unusable image file(s)" in logs[0] and "broken.png" in logs[0], split


def test_a_hand_edited_train_per_class_string_is_still_a_count(tmp_path, tiny_backbone):
    """config.json edited by hand to "train_per_class": "3": --evaluate --split train scored the
    run's draw of 3 per class before the split (split_loader took int() of it); it must not crash."""
    data = write_image_folder(tmp_path / "d", train=6, val=2, size=16)
    config = {"recipe": {"backbone": "tiny"}, "classes": ["class_0", "class_1"],
              "options": {"image_size": 32, "train_per_class": "3", "max_per_class": "5"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    ctx = context_for(tmp_path / "best.pth", None)
    assert (ctx.train_per_class, ctx.max_per_class) == (3, 5)
    loader, _ = split_loader(data, "train", ctx, log=lambda s: None)
    assert len(loader.dataset) == 6
    (tmp_path / "config.json").write_text(json.dumps(config | {"options": {"train_per_class": "three"}}))
    with pytest.raises(TLError, match="not a run config"):
        context_for(tmp_path / "best.pth", None)


def _edit_checkpoint(path, change) -> None:
    """A hand edit of last.ckpt that keeps it loadable: the digest is written anew."""
    ckpt = checkpoint.load_checkpoint(path)
    change(ckpt)
    ckpt["digest"] = files.state_digest(ckpt)
    torch.save(ckpt, path)


def test_resume_of_a_checkpoint_that_recorded_cached_phases_but_no_cache_mode(tmp_path, tiny_backbone, own_cache_dir):
    """A stage entry with `cached_phases` but no `feature_cache` words (nor the config's): the
    code before the split resumed it (caching only those phases); the split's CachePlan read
    `.kind` of a plan that was never recorded (AttributeError)."""
    shutil.copytree(RUN, tmp_path / "run")

    def forget_the_words(ckpt):
        del ckpt["config"]["feature_cache"], ckpt["config"]["stages"][0]["feature_cache"]
        ckpt["config"]["stages"][0]["cached_phases"] = []  # val, which this plan caches, was not cached

    _edit_checkpoint(tmp_path / "run" / "last.ckpt", forget_the_words)
    assert main.main(["--resume", str(tmp_path / "run" / "last.ckpt"), "--epochs", "2", "--data", str(DATA),
                      "--no-progress"]) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["stages"][0]["cached_phases"] == [] and config["results"]["best_epoch"] >= 0


def test_an_image_cache_speaks_before_the_feature_cache_line(tiny_data, tiny_backbone, tmp_path, own_cache_dir):
    """Before the split a stage said its --image-cache lines (over the limit here; on a GPU
    --device-images always says where its images are), then "feature cache: ..."."""
    module, logs = get_experiment("resnet_finetune"), []
    opts = RunOptions(data=tiny_data, backbone="tiny", weights="none", epochs=1, workers=0, out=tmp_path,
                      image_size=32, image_cache=True, cache_limit_gb=1e-9, plots=False, progress=False)
    run(module.RECIPE, module.build, opts, log=logs.append)
    said = [line.split(" for ")[0].split(":")[0] for line in logs if line.startswith(("image cache", "feature cache"))]
    assert said == ["image cache", "image cache", "feature cache"]


@pytest.mark.parametrize("hooks, message", [({"best_by": "accuracy"}, "best_by"),
                                            ({"scheduler_interval": "batch"}, "scheduler_interval")])
def test_the_loop_refuses_a_best_by_or_interval_it_does_not_know(hooks, message):
    """Before the split train_model refused these (a monitor edited into a checkpoint by hand
    stopped there); since, "accuracy" silently chose the best epoch by loss, and "batch"
    silently never stepped the schedule."""
    with pytest.raises(ValueError, match=message):
        _train(2, **hooks)
