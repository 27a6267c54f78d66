"""experiments/report.py: the README's answer and its commands, the provenance of each row, a
recipe's paragraph, the paired bootstrap's verdicts, and macro-F1 and balanced accuracy from
the saved predictions."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from experiments import report

ROOT = Path(__file__).resolve().parents[2]


def test_which_recipe_commands_name_the_backbone_of_the_row_they_answer_with():
    """The README's answer names the most accurate row (a recipe on a backbone); its command
    must train that row, not the same recipe's first row on another backbone."""
    import pandas as pd

    from experiments.report import which_recipe

    ROOT = Path(__file__).resolve().parents[2]
    summary = pd.read_csv(ROOT / "results" / "summary.csv")
    diffs = pd.read_csv(ROOT / "results" / "differences.csv")
    hym = summary[(summary.dataset == "hymenoptera_data") & (summary.status == "ok")]
    best = hym.loc[hym.headline_acc_mean.idxmax()]
    text = which_recipe(summary, diffs)
    assert f"`{best.experiment}` ({best.backbone})" in text
    assert f"python main.py -e {best.experiment} -b {best.backbone}" in text


def test_which_recipe_adds_epochs_only_to_a_row_trained_shorter_than_its_recipe():
    """A command in the README must retrain the row it answers with: `--epochs N` appears only when
    the row's epochs differ from the recipe's own, and only then does the text say it was shortened."""
    import pandas as pd

    from experiments import get_experiment
    from experiments.report import which_recipe

    own = get_experiment("modern_finetune").RECIPE.train_epochs

    def summary(epochs):
        return pd.DataFrame([dict(dataset="dogs-vs-cats", status="ok", experiment="modern_finetune",
                                  backbone="efficientnet_lite0", headline="test, epoch chosen on val",
                                  headline_acc_mean=0.99, headline_acc_std=0.004, train_epochs=epochs,
                                  train_images_per_s_mean=30.0, train_seconds_mean=500.0)])

    diffs = pd.DataFrame(columns=["dataset", "verdict", "a", "b"])
    full = which_recipe(summary(own), diffs)
    assert "--epochs" not in full and "other than the recipe's own" not in full
    assert f"{own} training epochs" in full
    short = which_recipe(summary(1), diffs)
    assert "--data data/dogs-vs-cats --epochs 1" in short
    assert "dogs-vs-cats run with `--epochs` other than the recipe's own" in short
    assert "1 training epoch at" in short


def test_provenance_says_which_rows_of_a_command_a_later_command_replaced():
    """results/README lists every command; a row rerun by a later command (same recipe and backbone)
    must not read as if the earlier, shorter command still made it."""
    from experiments.report import provenance

    first = dict(command="compare_all --epochs 2", experiments=["tutorial_finetune", "tutorial_frozen"],
                 backbones=["efficientnet_lite0", "own"])
    second = dict(command="compare_all", experiments=["tutorial_frozen"], backbones=["efficientnet_lite0"])
    lines = provenance({"datasets": {"dogs-vs-cats": {"data": "d", "commands": [first, second]}}})
    earlier = next(line for line in lines if "--epochs 2" in line)
    assert "since rerun by a later command: tutorial_frozen / efficientnet_lite0)" in earlier
    assert "tutorial_finetune /" not in earlier and "tutorial_frozen / own" not in earlier
    assert "since rerun" not in next(line for line in lines if "`compare_all`" in line)


@pytest.mark.parametrize("later", [
    dict(backbones=["resnet18"]), dict(backbones=["own"]),
    dict(backbones=["own", "efficientnet_lite0"], rows=[["resnet_scratch", "resnet18"]])])
def test_provenance_sees_a_rerun_whether_a_command_named_the_recipe_s_own_network_or_own(later):
    """`own` is the recipe's own network: an earlier command's `own` row is rerun by a later command's
    resnet18 row. A command that recorded the rows it made ("rows") is read by those alone: there
    resnet_scratch did not run on efficientnet_lite0, so that is not a rerun."""
    from experiments.report import provenance

    first = dict(command="compare_all --epochs 1", experiments=["resnet_scratch"],
                 backbones=["efficientnet_lite0", "own"])
    second = dict(command="compare_all", experiments=["resnet_scratch"], **later)
    lines = provenance({"datasets": {"d": {"data": "d", "commands": [first, second]}}})
    earlier = next(line for line in lines if "--epochs 1" in line)
    assert "since rerun by a later command: resnet_scratch / resnet18)" in earlier


def test_an_old_record_s_tuned_recipe_on_own_is_not_given_the_base_recipe_s_network():
    """In a record without "rows", tuned_X on `own` ran on its tuned file's backbone at the time, which
    the record does not say: it is left as `own` (the records test then names it), not X's resnet18."""
    from experiments.report import _pairs

    old = dict(experiments=["resnet_frozen", "tuned_modern_finetune"], backbones=["own"])
    assert _pairs(old) == [("resnet_frozen", "resnet18"), ("tuned_modern_finetune", "own")]


def test_a_recipe_paragraph_says_when_its_row_trained_fewer_epochs_than_the_recipe():
    """The recipe's note describes its own schedule ("every 7 of 25 epochs"); a shortened row must
    say so beside it, and a full row must not."""
    import pandas as pd

    from experiments.report import paragraph

    row = pd.Series(dict(experiment="tutorial_finetune", backbone="efficientnet_lite0", dataset="d", source="s",
                         status="ok", train_epochs=2, headline="val", headline_acc_mean=0.9, headline_acc_std=0.01,
                         seeds=3, baseline_val_acc_mean=0.5, best_val_acc_mean=0.9, best_val_acc_std=0.01,
                         best_epoch_mean=2.0, trainable_params=10, total_params=20, train_seconds_mean=5.0,
                         train_images_per_s_mean=9.0))
    empty = pd.DataFrame(columns=["dataset", "experiment", "backbone", "status"])
    assert "This row ran 2 training epochs (`--epochs 2`), not the recipe's 25." in paragraph(row, empty)
    assert "This row ran" not in paragraph(row.copy().replace({2: 25}), empty)


def test_paired_bootstrap_separates_noise_from_real_differences():
    rng = np.random.default_rng(0)
    a = (rng.random((3, 150)) < 0.8).astype(int)  # 3 seeds x 150 images, about 80% right
    diff, low, high = report.paired_bootstrap(a, a.copy())
    assert (diff, low, high) == (0, 0, 0) and report.verdict(low, high) == "within noise"
    b = np.zeros_like(a)  # always wrong
    diff, low, high = report.paired_bootstrap(a, b)
    assert low > 0.6 and report.verdict(low, high) == "A beats B"
    assert report.verdict(*report.paired_bootstrap(b, a)[1:]) == "B beats A"
    # two recipes that differ on a few images only: a 2-image gap on 150 is within noise
    c = a.copy()
    c[:, np.flatnonzero(a[0])[:2]] = 0
    diff, low, high = report.paired_bootstrap(a, c)
    assert 0 < diff < 0.02 and low <= 0 <= high and report.verdict(low, high) == "within noise"


def test_report_adds_macro_f1_and_balanced_accuracy_from_the_saved_predictions(tmp_path):
    """`python -m experiments.report` on (a part of) the committed results: no run is trained."""
    from experiments import report

    results, out = ROOT / "results", tmp_path / "results"
    summary = pd.read_csv(results / "summary.csv", dtype=str)
    runs = pd.read_csv(results / "runs.csv", dtype=str)
    keep = summary[(summary.dataset == "dogs-vs-cats") & summary.experiment.isin(["resnet_frozen", "vgg_transfer"])]
    (out / "predictions" / "dogs-vs-cats").mkdir(parents=True)
    keep.to_csv(out / "summary.csv", index=False)
    mine = runs[(runs.dataset == "dogs-vs-cats") & runs.experiment.isin(keep.experiment)]
    mine.to_csv(out / "runs.csv", index=False)
    for run in mine[mine.status == "ok"].run:
        shutil.copy(results / "predictions" / "dogs-vs-cats" / f"{run}.csv", out / "predictions" / "dogs-vs-cats")
    assert report.main([str(out)]) == 0

    after = pd.read_csv(out / "summary.csv", dtype=str)
    assert after[keep.columns].equals(keep.reset_index(drop=True))  # what was there is unchanged
    row = pd.read_csv(out / "summary.csv").set_index(["experiment", "backbone"]).loc[
        ("resnet_frozen", "efficientnet_lite0")]
    f1s, balanced = [], []
    for run in mine[(mine.experiment == "resnet_frozen") & (mine.status == "ok")].run:  # 3 seeds, by hand
        p = pd.read_csv(out / "predictions" / "dogs-vs-cats" / f"{run}.csv")
        recall = {c: (p.prediction[p.label == c] == c).mean() for c in ("cat", "dog")}
        precision = {c: (p.label[p.prediction == c] == c).mean() for c in ("cat", "dog")}
        f1s.append(np.mean([2 * precision[c] * recall[c] / (precision[c] + recall[c]) for c in recall]))
        balanced.append(np.mean(list(recall.values())))
    assert row.headline_macro_f1_mean == pytest.approx(np.mean(f1s))
    assert row.headline_macro_f1_std == pytest.approx(np.std(f1s, ddof=1))
    assert row.headline_balanced_acc_mean == pytest.approx(np.mean(balanced))
    not_run = pd.read_csv(out / "summary.csv").set_index(["experiment", "backbone"]).loc[("resnet_frozen", "resnet18")]
    assert np.isnan(not_run.headline_macro_f1_mean)
    page = (out / "README.md").read_text()
    assert "| **headline acc %** | headline macro-F1 % | headline balanced acc % |" in page
    assert f"| **{100 * row.headline_acc_mean:.1f} ± {100 * row.headline_acc_std:.1f}** " \
           f"| {100 * np.mean(f1s):.1f} ± {100 * np.std(f1s, ddof=1):.1f} | {100 * np.mean(balanced):.1f} ± " in page




def test_rows_with_numbers_tuned_for_another_backbone_say_so_and_stay_out_of_the_answer():
    from experiments.report import note

    assert "chosen by a search on an inner split" in note("tuned_modern_finetune")
    relabelled = note("lite0_tuned_modern_finetune")
    assert "chose for efficientnet_lite0" in relabelled and "not its tuned numbers" in relabelled
    summary = pd.read_csv(ROOT / "results" / "summary.csv")
    tuned = summary[summary.experiment == "tuned_modern_finetune"]
    searched = {(d, b) for d, b in zip(tuned.dataset, tuned.backbone)
                if (ROOT / "experiments" / "tuned" / f"modern_finetune-{d}-{b}.json").is_file()}
    assert len(tuned) and searched == set(zip(tuned.dataset, tuned.backbone))  # each row's numbers are its own
    readme = (ROOT / "README.md").read_text()
    answer = readme[readme.index("Which recipe should I use?"):]
    assert "tuned_modern_finetune` (" not in answer.split("The tuned recipes")[0]
