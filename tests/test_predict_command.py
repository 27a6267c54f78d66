"""Issue 22, "Your own photos, end to end": EXIF orientation in the one reader, a folder of
photos classified into a table, a classification report for every run and --evaluate, and
unbalanced classes (class weights, a balanced sampler, the imbalance study)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import main
from tests.conftest import write_image_folder
from tl import TLError, distributed
from tl.data import build_transforms, make_loaders
from tl.engine import balance, feature_store, images, metrics
from tl.engine.images import CheckedImageFolder, load_rgb
from tl.engine.options import RunOptions
from tl.recipe import Recipe, make_criterion

ROOT = Path(__file__).resolve().parents[1]
MEAN = STD = (0.5, 0.5, 0.5)
ORIENTATION = 0x0112  # the EXIF tag: 6 = "turn 90 degrees clockwise to view"


def _upright(seed: int = 0, size=(30, 20)) -> np.ndarray:
    """(H, W, 3) pixels of a photo taken in portrait: 20 wide, 30 tall, no symmetry."""
    return np.random.default_rng(seed).integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)


def _save_turned(pixels: np.ndarray, path, fmt: str, **options) -> None:
    """The pixels as a phone stores them: turned a quarter left, with Orientation 6 saying how to turn back."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    Image.fromarray(pixels).transpose(Image.Transpose.ROTATE_90).save(path, fmt, exif=exif, **options)


# ----------------------------------------------------------------------------- EXIF orientation
def test_a_turned_png_with_its_orientation_tag_reads_as_the_upright_photo(tmp_path):
    pixels = _upright()
    for k in range(2):  # a data set: class_0 holds the upright photo, class_1 the turned one
        (tmp_path / "train" / f"class_{k}").mkdir(parents=True)
    Image.fromarray(pixels).save(tmp_path / "train" / "class_0" / "upright.png")
    _save_turned(pixels, tmp_path / "train" / "class_1" / "turned.png", "PNG")
    with Image.open(tmp_path / "train" / "class_1" / "turned.png") as stored:
        assert stored.size == (30, 20)  # as stored: landscape
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "train" / "class_1" / "turned.png")), pixels)
    # what training, the caches and --evaluate read: the same tensor for both files
    ds = CheckedImageFolder(tmp_path / "train", build_transforms(MEAN, STD, size=16, augment=False)["val"])
    assert torch.equal(ds[0][0], ds[1][0])


def test_a_turned_jpeg_reads_upright(tmp_path):
    pixels = np.kron(_upright(1, (6, 4)), np.ones((8, 8, 1), dtype=np.uint8))  # 8x8 blocks survive JPEG
    _save_turned(pixels, tmp_path / "turned.jpg", "JPEG", quality=95, subsampling=0)
    read = np.asarray(load_rgb(tmp_path / "turned.jpg")).astype(int)
    assert read.shape == pixels.shape
    assert np.abs(read - pixels).mean() < 3 < np.abs(read - pixels[::-1, ::-1]).mean()  # upright, not upside down


def test_the_feature_cache_key_names_the_reader(tiny_data, monkeypatch):
    ds = CheckedImageFolder(tiny_data / "val", build_transforms(MEAN, STD, size=16, augment=False)["val"])

    def key():
        return feature_store.cache_key("d", ds, feature_store.FeaturePass(
            views=1, random_views=False, seed=0, workers=0, dtype=torch.float32, device="cpu", channels_last=False,
            folded=False))

    before = key()
    monkeypatch.setattr(feature_store, "READER", images.READER + ", and something new")
    assert key() != before  # features stored by another reader are not found again


# ----------------------------------------------------------------------------- the classification report
def test_report_figures_match_a_confusion_matrix_worked_by_hand(tmp_path):
    # true a: 3 called a, 1 called b;  true b: 2 called a, 2 called b;  true c: 1 called b, 1 called c
    pairs = [("a", "a")] * 3 + [("a", "b")] + [("b", "a")] * 2 + [("b", "b")] * 2 + [("c", "b"), ("c", "c")]
    labels, predicted = zip(*pairs)
    paths = [f"val/{t}/{i}.jpg" for i, (t, _) in enumerate(pairs)]
    report = metrics.classification_report(labels, predicted, paths, ["a", "b", "c", "d"])  # d: never seen
    assert report["support"].tolist() == [4, 4, 2, 0]
    assert report["precision"][:3] == pytest.approx([3 / 5, 2 / 4, 1 / 1])  # column sums 5, 4, 1
    assert report["recall"][:3] == pytest.approx([3 / 4, 2 / 4, 1 / 2])  # row sums 4, 4, 2
    assert report["f1"][:3] == pytest.approx([2 / 3, 1 / 2, 2 / 3])  # 2PR / (P + R)
    assert report["accuracy"] == pytest.approx(6 / 10)
    assert report["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2 + 1 / 2) / 3)  # d has no support
    assert report["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)  # d neither true nor predicted
    assert [(p["true"], p["predicted"], p["count"]) for p in report["pairs"]] == \
        [("b", "a", 2), ("a", "b", 1), ("c", "b", 1)]
    assert report["pairs"][0]["files"] == ["val/b/4.jpg", "val/b/5.jpg"]
    # a class that is predicted but never true counts in macro-F1 (F1 0), not in balanced accuracy
    lopsided = metrics.scores(np.array([[2, 2], [0, 0]]))
    assert lopsided["macro_f1"] == pytest.approx((2 * 1 * 0.5 / 1.5 + 0) / 2)
    assert lopsided["balanced_accuracy"] == pytest.approx(0.5)

    page = metrics.write_report(tmp_path, report, "by hand")
    table = pd.read_csv(tmp_path / "classification_report.csv").set_index("class")
    assert table.loc["a", "precision"] == pytest.approx(0.6) and table.loc["c", "support"] == 2
    assert table.loc["macro average", "f1"] == pytest.approx(report["macro_f1"])
    assert table.loc["balanced accuracy", "recall"] == pytest.approx(report["balanced_accuracy"])
    assert table.loc["accuracy", "f1"] == pytest.approx(0.6)
    text = page.read_text()
    assert "| a | 0.6000 | 0.7500 | 0.6667 | 4 |" in text
    assert "- b -> a: 2 image(s): `val/b/4.jpg`, `val/b/5.jpg`" in text
    confused = pd.read_csv(tmp_path / "confused_pairs.csv")
    assert confused.iloc[0].tolist() == ["b", "a", 2, "val/b/4.jpg; val/b/5.jpg"]


def _train(data, out, *extra, experiment="resnet_scratch") -> Path:
    """A one-epoch --quick run of the tiny backbone; its run folder."""
    assert main.main(["-e", experiment, "-b", "tiny", "--data", str(data), "--quick", "--out", str(out),
                      "--no-progress", *map(str, extra)]) == 0
    (run_dir,) = Path(out).iterdir()
    return run_dir


def test_every_run_folder_and_every_evaluate_get_a_classification_report(tmp_path, tiny_backbone, capsys):
    data = write_image_folder(tmp_path / "data", train=8, val=4, phases=("train", "val", "test"))
    run_dir = _train(data, tmp_path / "runs", "--save-every-epoch")
    headline = json.loads((run_dir / "config.json").read_text())["results"]
    predictions = pd.read_csv(run_dir / "headline_predictions.csv")
    table = pd.read_csv(run_dir / "classification_report.csv").set_index("class")
    assert table.loc["accuracy", "f1"] == pytest.approx(headline["headline_acc"])  # the headline model, on test
    assert table.loc[["class_0", "class_1"], "support"].tolist() == [4, 4]
    expected = metrics.classification_report(predictions.label, predictions.prediction, predictions.path,
                                             ["class_0", "class_1"])
    assert table.loc["macro average", "f1"] == pytest.approx(expected["macro_f1"])
    assert "macro-F1" in capsys.readouterr().out and (run_dir / "confused_pairs.csv").is_file()
    assert "Classification report" in (run_dir / "classification_report.md").read_text()

    assert main.main(["--evaluate", str(run_dir / "best.pth"), "--split", "val"]) == 0
    out = capsys.readouterr().out
    accuracy = float(out.split("accuracy ")[1].split()[0])
    report = pd.read_csv(run_dir / "evaluate-best-val" / "classification_report.csv").set_index("class")
    assert report.loc["accuracy", "f1"] == pytest.approx(accuracy, abs=1e-4)
    assert report.loc[["class_0", "class_1"], "support"].tolist() == [4, 4]  # val's images, not test's
    assert f"-> {run_dir / 'evaluate-best-val' / 'classification_report.md'}" in out
    assert main.main(["--evaluate", str(run_dir), "--split", "test"]) == 0  # every epoch file: the final one's
    final = pd.read_csv(run_dir / "evaluate-01-test" / "classification_report.csv").set_index("class")
    assert final.loc["accuracy", "f1"] == pytest.approx(pd.read_csv(run_dir / "eval_test.csv").acc.iloc[-1])


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


# ----------------------------------------------------------------------------- a folder in, a table out
@pytest.fixture
def tiny_run(tmp_path, tiny_backbone) -> Path:
    return _train(write_image_folder(tmp_path / "data"), tmp_path / "runs")


def _photo_folder(root: Path) -> Path:
    """Photos in sub-folders, beside a text file, a broken 'photo', a truncated PNG and a hidden folder."""
    write_image_folder(root / "holiday", train=4, phases=("train",), seed=7)  # holiday/train/class_k/00N.png
    (root / "notes.txt").write_text("not a photo")
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    whole = (root / "holiday" / "train" / "class_0" / "000.png").read_bytes()
    (root / "cut.png").write_bytes(whole[: len(whole) // 2])
    (root / ".thumbs").mkdir()
    (root / ".thumbs" / "x.png").write_bytes(whole)
    return root


def test_a_folder_of_photos_becomes_a_table(tiny_run, tmp_path, capsys):
    from tl.engine.model_loading import context_for, load_model
    from tl.engine.predict import predict_images
    from tl.models import get_backbone

    photos = _photo_folder(tmp_path / "photos")
    out = tmp_path / "out"
    assert main.main(["--predict", str(photos), "--checkpoint", str(tiny_run / "best.pth"), "--out", str(out),
                      "--batch-size", "3", "--workers", "0", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    (table,) = out.glob("predictions-*.csv")
    rows = pd.read_csv(table)
    assert list(rows.columns) == ["path", "prediction", "p_class_0", "p_class_1"]
    assert sorted(rows.path) == [f"holiday/train/class_{k}/{i:03d}.png" for k in (0, 1) for i in range(4)]
    assert rows[["p_class_0", "p_class_1"]].sum(axis=1).tolist() == pytest.approx([1.0] * 8, abs=1e-6)
    assert (rows.prediction == rows[["p_class_0", "p_class_1"]].idxmax(axis=1).str[2:]).all()
    for name, why in (("notes.txt", "not an image file"), ("broken.jpg", ""), ("cut.png", ""),
                      (".thumbs", "hidden folder, not read")):
        assert f"  {name}: {why}" in printed  # listed by name, and in no table
    assert "skipped 4 file(s) or folder(s)" in printed
    counts = rows.prediction.value_counts()
    assert "predicted classes: " + ", ".join(f"{c} {n}" for c, n in counts.items()) in printed
    # the numbers --predict gives one named file
    ctx = context_for(tiny_run / "best.pth", None)
    spec = get_backbone("tiny")
    one = photos / rows.path[0]
    ((_, top),) = predict_images(load_model(tiny_run / "best.pth", ctx, 2), [one], ["class_0", "class_1"], spec.mean,
                                 spec.std, ctx.image_size, top=1)
    assert rows.loc[0, f"p_{top[0][0]}"] == pytest.approx(top[0][1], abs=1e-6)

    # --csv FILE, and never over an existing file. The promise across batch sizes: the same photos
    # and classes, probabilities within float32 rounding (a batch of another shape may take another
    # kernel and round differently in the last bit); at one batch size, bit for bit.
    assert main.main(["--predict", str(photos), "--checkpoint", str(tiny_run / "best.pth"), "--csv",
                      str(tmp_path / "mine.csv"), "--workers", "0", "--no-progress"]) == 0
    mine = pd.read_csv(tmp_path / "mine.csv")
    assert mine[["path", "prediction"]].equals(rows[["path", "prediction"]])
    probabilities = ["p_class_0", "p_class_1"]
    assert mine[probabilities].to_numpy() == pytest.approx(rows[probabilities].to_numpy(), abs=1e-5)
    assert main.main(["--predict", str(photos), "--checkpoint", str(tiny_run / "best.pth"), "--csv",
                      str(tmp_path / "again.csv"), "--batch-size", "3", "--workers", "0", "--no-progress"]) == 0
    assert pd.read_csv(tmp_path / "again.csv").equals(rows)
    capsys.readouterr()
    before = table.read_bytes()
    assert main.main(["--predict", str(photos), "--checkpoint", str(tiny_run / "best.pth"), "--csv", str(table)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --csv") and "exists already" in err and len(err.strip().splitlines()) == 1
    assert table.read_bytes() == before


def test_an_exported_model_alone_classifies_a_folder(tiny_run, tmp_path):
    photos = write_image_folder(tmp_path / "photos", train=3, phases=("train",), seed=3)
    assert main.main(["--export", str(tiny_run), "--format", "torchscript"]) == 0
    alone = tmp_path / "shipped"
    alone.mkdir()
    shutil.copy(tiny_run / "model.pt", alone / "model.pt")  # no config.json beside it
    tables = {}
    for name, checkpoint in (("pth", tiny_run / "best.pth"), ("pt", alone / "model.pt")):
        assert main.main(["--predict", str(photos), "--checkpoint", str(checkpoint), "--csv",
                          str(tmp_path / f"{name}.csv"), "--workers", "0", "--no-progress"]) == 0
        tables[name] = pd.read_csv(tmp_path / f"{name}.csv")
    assert tables["pt"].path.tolist() == tables["pth"].path.tolist()
    assert tables["pt"].prediction.tolist() == tables["pth"].prediction.tolist()
    assert np.allclose(tables["pt"].iloc[:, 2:], tables["pth"].iloc[:, 2:], atol=1e-5)


def test_a_single_logit_head_gives_both_classes(tmp_path):
    from tl.engine.predict import classify, table_text

    photos = write_image_folder(tmp_path / "photos", train=2, phases=("train",))
    files = sorted(str(p) for p in photos.rglob("*.png"))
    torch.manual_seed(0)
    one_logit = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 1))
    probabilities, failed = classify(one_logit, files, build_transforms(MEAN, STD, size=8, augment=False)["val"],
                                     progress=False)
    assert not failed and len(probabilities) == 4
    with torch.no_grad():
        logit = one_logit(build_transforms(MEAN, STD, size=8, augment=False)["val"](load_rgb(files[0]))[None])[0, 0]
    assert probabilities[0].tolist() == pytest.approx([1 - torch.sigmoid(logit).item(), torch.sigmoid(logit).item()])
    rows = pd.read_csv(io.StringIO(table_text(photos, files, probabilities, ["cat", "dog"])))
    assert list(rows.columns) == ["path", "prediction", "p_cat", "p_dog"]
    assert rows[["p_cat", "p_dog"]].sum(axis=1).tolist() == pytest.approx([1.0] * 4, abs=1e-6)


def test_predicting_a_folder_refuses_bad_input_before_writing(tiny_run, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("no photos here")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    photos = write_image_folder(tmp_path / "photos", train=1, phases=("train",))
    best = str(tiny_run / "best.pth")
    for argv, words in (
            (["--predict", str(empty), "--checkpoint", best, "--out", str(tmp_path / "out")], "holds no image files"),
            (["--predict", str(photos), "--checkpoint", best, "--csv", str(a_file / "t.csv")], "is a file, not a"),
            (["--predict", str(photos), str(photos), "--checkpoint", best], "one folder alone"),
            (["--predict", str(photos / "train" / "class_0" / "000.png"), "--checkpoint", best, "--csv",
              str(tmp_path / "t.csv")], "--csv names the table of --predict DIR")):
        assert main.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "t.csv").exists()
    (photos / "train" / "class_0" / "000.png").write_bytes(b"")  # only unreadable 'images' left
    (photos / "train" / "class_1" / "000.png").write_bytes(b"")
    assert main.main(["--predict", str(photos), "--checkpoint", best, "--out", str(tmp_path / "out"),
                      "--workers", "0"]) == 2
    assert "none of the 2 image file(s)" in capsys.readouterr().err and not list((tmp_path / "out").glob("*.csv"))


# ----------------------------------------------------------------------------- unbalanced classes
def test_class_weights_are_the_inverse_class_frequency_in_the_loss():
    weights = balance.inverse_frequency([10, 2])  # N = 12, C = 2: 12 / (2 * 10), 12 / (2 * 2)
    assert weights.tolist() == pytest.approx([0.6, 3.0])
    assert balance.inverse_frequency([5, 5, 5]).tolist() == pytest.approx([1, 1, 1])
    logits, labels = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), torch.tensor([0, 1, 1])
    recipe = Recipe(name="r", source="s", strategy="s")
    per_image = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    expected = (per_image * weights[labels]).sum() / weights[labels].sum()  # the weighted mean
    assert make_criterion(recipe, weights)(logits, labels).item() == pytest.approx(expected.item())
    assert make_criterion(recipe)(logits, labels).item() == pytest.approx(per_image.mean().item())
    one = make_criterion(Recipe(name="r", source="s", strategy="s", loss="bce_logit"), weights)
    assert one.pos_weight.tolist() == pytest.approx([10 / 2])  # n_0 / n_1: class 1 is the positive one


def _labels_of(loader) -> list[int]:
    return [int(t) for _, labels in loader for t in labels]


def test_the_balanced_sampler_draws_every_class_equally_and_repeats_from_its_generator():
    targets = torch.tensor([0] * 40 + [1] * 8)
    data = torch.utils.data.TensorDataset(torch.arange(48.0), targets)
    _, weights = balance.balance(RunOptions(data=Path("d"), balanced_sampler=True), targets, ["a", "b"], log=print)
    generator = torch.Generator().manual_seed(3)
    loader = make_loaders({"train": data}, 8, generator=generator, sample_weights=weights)["train"]
    drawn = [t for _ in range(50) for t in _labels_of(loader)]
    assert len(drawn) == 50 * 48 and 0.45 < np.mean(drawn) < 0.55  # class b: 1/6 of the images, half the draws
    state = generator.get_state()
    next_epoch = _labels_of(loader)
    generator.set_state(state)  # what --resume restores
    assert _labels_of(loader) == next_epoch
    plain = make_loaders({"train": data}, 8, generator=torch.Generator().manual_seed(3))["train"]
    assert sorted(_labels_of(plain)) == targets.tolist()  # without weights: a permutation, as before


def test_under_torchrun_each_process_takes_its_share_of_one_weighted_draw(monkeypatch):
    weights = torch.tensor([1.0] * 9 + [5.0] * 2)
    shares = [distributed.WeightedShardSampler(weights, 2, rank, seed=4) for rank in (0, 1)]
    for epoch in (0, 1):
        for s in shares:
            s.set_epoch(epoch)
        drawn = torch.multinomial(weights.double(), 12, replacement=True,
                                  generator=torch.Generator().manual_seed(4 + epoch)).tolist()
        assert list(shares[0]) == drawn[0::2] and list(shares[1]) == drawn[1::2]  # dealt out, nothing lost
        assert len(shares[0]) == len(shares[1]) == 6
    assert list(shares[0]) != list(distributed.WeightedShardSampler(weights, 2, 0, seed=4))  # epoch 1 != epoch 0
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    loader = make_loaders({"train": torch.utils.data.TensorDataset(torch.arange(11.0))}, 4, seed=4,
                          sample_weights=weights)["train"]
    assert isinstance(loader.sampler, distributed.WeightedShardSampler) and loader.sampler.rank == 1
    distributed.set_epoch(loader, 1)
    assert [int(x) for (batch,) in loader for x in batch] == list(shares[1])


def _unbalanced(root: Path) -> Path:
    """class_0: 12 training images, class_1: 3 (4x fewer); val balanced."""
    data = write_image_folder(root, train=12, val=6)
    for extra in sorted((data / "train" / "class_1").iterdir())[3:]:
        extra.unlink()
    return data


def test_unbalanced_runs_say_so_and_both_options_resume_exactly_with_the_feature_cache(
        tmp_path, pretrained, own_cache_dir, capsys):
    from tests.test_exactness import _assert_same_run
    from tests.test_exactness import _train as train_frozen

    data = _unbalanced(tmp_path / "data")
    options = ("--class-weights", "auto", "--balanced-sampler", "--no-augment")  # no augmentation: train cached
    full = train_frozen(data, tmp_path / "full", 3, *options, weights=pretrained)
    printed = capsys.readouterr().out
    assert "differ in size by more than 3x (class_0 12, class_1 3)" in printed
    assert "Balancing with --class-weights and --balanced-sampler" in printed
    assert "feature cache: train + val" in printed
    config = json.loads((full / "config.json").read_text())
    assert config["options"]["class_weights"] == "auto" and config["options"]["balanced_sampler"] is True
    assert config["train_class_counts"] == {"class_0": 12, "class_1": 3}
    half = train_frozen(data, tmp_path / "half", 1, *options, weights=pretrained)
    assert main.main(["--resume", str(half / "last.ckpt"), "--epochs", "3", "--no-progress"]) == 0
    _assert_same_run(full, half)
    plain = train_frozen(data, tmp_path / "plain", 3, "--no-augment", weights=pretrained)
    assert "try --class-weights auto (the loss) or --balanced-sampler" in capsys.readouterr().out
    assert pd.read_csv(plain / "history.csv").loss.tolist() != pd.read_csv(full / "history.csv").loss.tolist()


def test_balancing_options_refuse_what_they_cannot_mean(tmp_path, tiny_backbone, capsys):
    with pytest.raises(SystemExit) as info:
        main.main(["-e", "resnet_scratch", "--data", str(tmp_path), "--class-weights", "inverse"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and [line for line in err.splitlines() if "error:" in line] == [
        "main.py: error: argument --class-weights: the one choice is 'auto' (inverse class frequency), got 'inverse'"]
    with pytest.raises(TLError, match="--class-weights takes 'auto'"):  # the same through the API
        balance.balance(RunOptions(data=tmp_path, class_weights="inverse"), [0, 1], ["a", "b"])
    one_class = write_image_folder(tmp_path / "one", classes=1)
    for option in (["--balanced-sampler"], ["--class-weights", "auto"]):
        assert main.main(["-e", "resnet_scratch", "-b", "tiny", "--data", str(one_class), "--quick",
                          "--out", str(tmp_path / "runs"), *option]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {option[0]} balance classes against each other") and "one class" in err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing half-made


def test_a_seeded_fraction_of_a_class_is_kept_for_training_only(tmp_path):
    from tl.engine.selection import ImageChoice, fraction_draw, nested_draw, select_images

    samples = [(f"c{k}/{i:03d}.png", k) for k in range(2) for i in range(30)]
    kept = fraction_draw(samples, ["cat", "dog"], {"cat": 0.1}, seed=0)
    cats = [s for s in kept if s[1] == 0]
    assert len(cats) == 3 and [s for s in kept if s[1] == 1] == samples[30:]  # 10% of the cats, every dog
    assert set(cats) == set(nested_draw(samples, ["cat", "dog"], 3, seed=0)[:3])  # the start of the nested draw
    assert fraction_draw(samples, ["cat", "dog"], {"cat": 0.1}, seed=1) != kept  # seeded
    assert len(fraction_draw(samples, ["cat", "dog"], {"cat": 0.001})) == 31  # at least one image
    with pytest.raises(TLError, match="names cow, not a class"):
        fraction_draw(samples, ["cat", "dog"], {"cow": 0.5})
    data = write_image_folder(tmp_path / "data", train=10, val=4, phases=("train", "val", "test"))
    transforms = build_transforms(MEAN, STD, size=16, augment=False)
    sets = select_images(ImageChoice(data, train_fraction={"class_1": 0.2}), transforms, log=lambda s: None)
    assert [sets["train"].targets.count(k) for k in (0, 1)] == [10, 2]
    assert len(sets["val"]) == len(sets["test"]) == 8  # untouched
    args = main.build_parser().parse_args(["-e", "resnet_frozen", "--train-fraction", "class_1=0.2"])
    assert args.train_fraction == {"class_1": 0.2}


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
