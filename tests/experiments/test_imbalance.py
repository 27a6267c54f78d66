"""experiments/imbalance.py on tiny data with one seed: every figure from the runs' own per-image
predictions on the untouched test split, its table, page and picture."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.conftest import write_image_folder


def test_the_imbalance_study_on_tiny_data_with_one_seed(tmp_path, pretrained, own_cache_dir, capsys):
    from experiments import imbalance

    data = write_image_folder(tmp_path / "data", train=10, val=4, phases=("train", "val", "test"))
    out = tmp_path / "results"
    assert imbalance.main(["--data", str(data), "--keep", "class_0=0.1", "--backbone", "tiny", "--weights",
                           str(pretrained), "--seeds", "0", "--quick", "--workers", "0", "--out", str(out),
                           "--runs-dir", str(tmp_path / "runs")]) == 0
    runs = pd.read_csv(out / "imbalance.csv")
    assert len(runs) == 6 and (runs.status == "ok").all()  # 2 recipes x 3 ways x 1 seed
    assert set(runs.way) == {"plain", "weights", "sampler"} and set(runs.recipe) == {"resnet_frozen", "resnet_finetune"}
    assert (runs.train_counts == "class_0=1 class_1=8").all()  # --quick keeps 8, then 10% of them, at least 1
    assert (runs.headline == "test, epoch chosen on val").all()
    for r in runs.itertuples():  # every figure from the run's own per-image predictions, on the untouched test split
        p = pd.read_csv(out / "imbalance" / f"{r.run}.csv")
        assert len(p) == 8 and p.path.str.startswith("test/").all()
        assert r.accuracy == pytest.approx((p.label == p.prediction).mean())
        assert r.minority_recall == pytest.approx((p.prediction[p.label == "class_0"] == "class_0").mean())
        recalls = [(p.prediction[p.label == c] == c).mean() for c in ("class_0", "class_1")]
        assert r.balanced_accuracy == pytest.approx(np.mean(recalls))
    configs = {r.way: json.loads((tmp_path / "runs" / r.run / "config.json").read_text())["options"]
               for r in runs[runs.recipe == "resnet_frozen"].itertuples()}
    assert configs["weights"]["class_weights"] == "auto" and not configs["weights"]["balanced_sampler"]
    assert configs["sampler"]["balanced_sampler"] and configs["plain"]["class_weights"] is None
    page = (out / "imbalance.md").read_text()
    assert "| resnet_frozen | sampler | 1 |" in page
    with Image.open(out / "imbalance.png") as picture:  # the picture beside the table
        assert picture.format == "PNG" and max(picture.size) <= 14 * 110 + 1
    for recipe in ("resnet_frozen", "resnet_finetune"):
        for way in ("weights", "sampler"):
            for measure in ("accuracy", "balanced accuracy", "minority recall"):
                assert f"- {recipe}, {way}, {measure}: " in page
