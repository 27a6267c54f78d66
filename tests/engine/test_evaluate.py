"""tl/engine/evaluate.py: split_loader rebuilds the images a run saw (its val split, its seeded
--train-per-class draw, its --verify-images scan) and reports the files it leaves out;
evaluate_folder names the best epoch by training's rule on a tie."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from experiments import get_experiment
from tests.conftest import write_image_folder
from tl.data import build_transforms
from tl.engine.evaluate import split_loader
from tl.engine.model_loading import ModelContext
from tl.engine.options import RunOptions
from tl.engine.run import run
from tl.engine.selection import _first_per_class, image_datasets, nested_draw


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


@pytest.mark.usefixtures("own_cache_dir")
def test_evaluate_train_split_scores_the_draw_of_a_max_per_class_run(tiny_data, tiny_backbone, tmp_path):
    """--train-per-class 3 with --max-per-class 6 (or --quick's 8) trains on a draw of 3 from the
    first 6 images per class; --evaluate --split train scores that very draw, not 3 drawn from all 12."""
    module = get_experiment("resnet_finetune")
    opts = RunOptions(data=tiny_data, backbone="tiny", weights="none", epochs=1, batch_size=4, workers=0,
                      out=tmp_path / "runs", image_size=32, progress=False, plots=False,
                      max_per_class=6, train_per_class=3)
    result = run(module.RECIPE, module.build, opts, log=lambda s: None)
    from tl.engine.evaluate import split_loader
    from tl.engine.model_loading import context_for

    loader, _ = split_loader(tiny_data, "train", context_for(result.run_dir / "best.pth", None), log=lambda s: None)
    full = image_datasets(tiny_data, build_transforms((0.5,) * 3, (0.5,) * 3, size=32))["train"]
    trained = nested_draw(_first_per_class(full.samples, 6), full.classes, 3, seed=0)
    assert loader.dataset.samples == trained


@pytest.mark.usefixtures("own_cache_dir")
def test_evaluate_train_split_of_a_verify_images_run_scores_the_images_it_trained_on(tiny_data, tiny_backbone,
                                                                                      tmp_path):
    """A --verify-images run (what read_image's message tells a user to do when a file breaks
    mid-run) skips a PNG whose IDAT data is corrupt but whose IEND is present (the quick scan
    passes it). split_loader rebuilds the train draw from a scan verified as the run's was, so the
    seeded --train-per-class draw is the images the run trained on, the broken file left out."""
    from tl.engine.evaluate import split_loader
    from tl.engine.model_loading import context_for

    bad = tiny_data / "train" / "class_0" / "000.png"
    data = bytearray(bad.read_bytes())
    i = data.find(b"IDAT")
    for k in range(i + 20, i + 60):
        data[k] ^= 0xFF
    bad.write_bytes(bytes(data))
    module = __import__("experiments.recipes.resnet_finetune", fromlist=["RECIPE"])
    opts = RunOptions(data=tiny_data, backbone="tiny", weights="none", epochs=1, batch_size=4, workers=0,
                      out=tmp_path / "runs", image_size=32, progress=False, plots=False, verify_images=True,
                      train_per_class=3)
    result = run(module.RECIPE, module.build, opts, log=lambda s: None)
    from tl.data import build_transforms
    from tl.engine.selection import image_datasets, keep_train_per_class

    trained = image_datasets(tiny_data, build_transforms((0.5,) * 3, (0.5,) * 3, size=32), verify=True)["train"]
    keep_train_per_class(trained, 3, 0)
    loader, _ = split_loader(tiny_data, "train", context_for(result.run_dir / "best.pth", None), log=lambda s: None)
    assert loader.dataset.samples == trained.samples


@pytest.mark.usefixtures("own_cache_dir")
def test_evaluate_names_the_best_epoch_by_training_s_rule_on_a_tie(tmp_path, monkeypatch):
    from tl.engine import evaluate as ev

    for epoch in range(4):
        (tmp_path / f"{epoch:02d}.pth").write_bytes(b"")
    scores = {"00.pth": (0.7, 0.60), "01.pth": (0.9, 0.40), "02.pth": (0.8, 0.30), "03.pth": (0.9, 0.35)}
    monkeypatch.setattr(ev, "load_model", lambda file, *a, **k: file.name)
    monkeypatch.setattr(ev, "write_evaluation_report", lambda *a, **k: None)  # (its report: tested elsewhere)
    monkeypatch.setattr(ev, "evaluate", lambda name, *a, **k: {"acc": scores[name][0], "loss": scores[name][1],
                                                                  "per_class_acc": []})
    lines = []
    ev.evaluate_folder(tmp_path, SimpleNamespace(tta=False), SimpleNamespace(dataset=None), [], "cpu", "val",
                       log=lines.append)
    assert "best val accuracy 0.9000 at epoch 3" in lines[-1]  # equal accuracy: the lower loss, as training picks
