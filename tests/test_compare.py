"""compare_all: every column, right statuses, summary figures recomputable from runs.csv, plots."""

from __future__ import annotations

import pandas as pd
import pytest
from PIL import Image

from experiments import NAMES, compare_all

SUMMARY_COLUMNS = {
    "experiment", "source", "backbone", "weights", "strategy", "trainable_params", "total_params", "train_epochs",
    "batch_size", "optimizer", "learning_rates", "baseline_val_acc_mean", "best_val_acc_mean", "best_val_acc_std",
    "final_val_acc_mean", "final_val_acc_std", "best_epoch_mean", "seeds", "train_seconds_mean",
    "train_images_per_s_mean", "device", "torch", "date", "status", "reason",
}


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    from tests.conftest import block_network, write_image_folder

    tmp = tmp_path_factory.mktemp("compare")
    data = write_image_folder(tmp / "data", size=64)
    out = tmp / "results"
    with pytest.MonkeyPatch.context() as mp:  # module-scoped, so conftest's autouse block is not active yet
        block_network(mp, tmp / "torch_home")
        code = compare_all.main(["--quick", "--data", str(data), "--backbone", "efficientnet_lite0", "own",
                                 "--seeds", "0", "1", "--out", str(out), "--runs-dir", str(tmp / "runs"),
                                 "--workers", "0"])
    return code, out


def test_quick_comparison_writes_every_column_and_row(comparison):
    code, out = comparison
    assert code == 0  # rows that could not run do not fail the command
    summary = pd.read_csv(out / "summary.csv")
    assert SUMMARY_COLUMNS <= set(summary.columns)
    assert len(summary) == 2 * len(NAMES)
    lite = summary[summary.backbone == "efficientnet_lite0"]
    assert list(lite.experiment) == list(NAMES) and (lite.status == "ok").all() and (lite.seeds == 2).all()
    assert set(lite.weights) == {"packaged", "none"}  # resnet_scratch keeps its random init


def test_missing_weights_are_not_run_rows_with_the_reason(comparison):
    _, out = comparison
    summary = pd.read_csv(out / "summary.csv").set_index(["experiment", "backbone"])
    assert summary.loc[("resnet_scratch", "resnet18"), "status"] == "ok"  # random init needs no download
    for name, backbone in [("resnet_finetune", "resnet18"), ("resnet_frozen", "resnet18"),
                           ("resnet_bn_only", "resnet18"), ("vgg_transfer", "vgg16"), ("vgg_finetune", "vgg16")]:
        row = summary.loc[(name, backbone)]
        assert row.status == "not run" and "ImageNet weights" in row.reason and row.seeds == 0


def test_summary_figures_are_recomputable_from_runs_csv(comparison):
    _, out = comparison
    runs = pd.read_csv(out / "runs.csv")
    summary = pd.read_csv(out / "summary.csv").set_index(["experiment", "backbone"])
    ok = runs[runs.status == "ok"].groupby(["experiment", "backbone"])
    for key, acc in ok.best_val_acc.mean().items():
        assert summary.loc[key, "best_val_acc_mean"] == pytest.approx(acc)
    for key, std in ok.final_val_acc.std().items():
        assert summary.loc[key, "final_val_acc_std"] == pytest.approx(std, nan_ok=True)
    for run, best in zip(runs[runs.status == "ok"].run, runs[runs.status == "ok"].best_val_acc):
        history = pd.read_csv(out / "history" / f"{run}.csv")
        assert history[history.phase == "val"].acc.max() == pytest.approx(best)


def test_plots_and_report_are_written(comparison):
    _, out = comparison
    for name in ["curves.png", "comparison.png", "curves_resnet_frozen.png",
                 "curves_resnet_scratch_resnet18.png", "curves_resnet_scratch_efficientnet_lite0.png"]:
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.width >= 600 and img.height >= 300
    report = (out / "README.md").read_text()
    assert "python -m experiments.compare_all --quick" in report and "| resnet_frozen |" in report
    assert "not run" in report
