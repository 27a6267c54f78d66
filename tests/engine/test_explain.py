"""Issue 16, "Learn by looking": nested data subsets, class-activation maps, top losses,
feature projections, the torchinfo summary, and the exported model (ONNX / TorchScript)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

import main
from tests.conftest import TinyNet
from tl.data import build_transforms
from tl.engine.explain import class_activation_maps, pca_2d, top_losses
from tl.engine.selection import image_datasets, nested_draw
from tl.engine.weights import build_model
from tl.models import BACKBONES, Backbone, format_parameter_table, get_backbone, set_trainable


def _train(data: Path, out: Path, backbone: str = "tiny", experiment: str = "resnet_scratch", *extra: str) -> Path:
    assert main.main(["-e", experiment, "-b", backbone, "--data", str(data), "--quick", "--epochs", "3",
                      "--out", str(out), "--no-progress", *extra]) == 0
    (run_dir,) = out.iterdir()
    return run_dir


@pytest.fixture
def tiny_run(tiny_data, tiny_backbone, tmp_path) -> Path:
    return _train(tiny_data, tmp_path / "runs")


# ----------------------------------------------------------------------------- data-efficiency subsets
def test_nested_draw_is_class_balanced_nested_and_seeded():
    samples = [(f"c{k}/{i:03d}.png", k) for k in range(3) for i in range(30)]
    classes = ["a", "b", "c"]
    draws = {n: nested_draw(samples, classes, n, seed=0) for n in (2, 5, 10, 25)}
    for n, draw in draws.items():
        assert [t for _, t in draw].count(0) == [t for _, t in draw].count(2) == n  # balanced
    for small, large in ((2, 5), (5, 10), (10, 25)):
        assert set(draws[small]) < set(draws[large])  # nested: more images only add images
    assert draws[5] != [s for s in samples if int(s[0][3:6]) < 5]  # not the first files by name
    assert nested_draw(samples, classes, 5, seed=1) != draws[5]  # the seed draws another subset
    assert nested_draw(list(reversed(samples)), classes, 5, seed=0) == draws[5]  # the order given does not matter
    with pytest.raises(Exception, match="fewer than the 31 per class"):
        nested_draw(samples, classes, 31)


def test_train_per_class_trains_on_the_draw_and_leaves_val_alone(tiny_data, tiny_backbone, tmp_path):
    run_dir = _train(tiny_data, tmp_path / "runs", "tiny", "resnet_scratch", "--train-per-class", "3",
                     "--max-per-class", "100")
    config = json.loads((run_dir / "config.json").read_text())
    assert config["dataset_sizes"] == {"train": 6, "val": 12}
    assert config["options"]["train_per_class"] == 3
    # --evaluate --split train scores the images the run trained on, not the whole train folder
    from tl.engine.evaluate import split_loader
    from tl.engine.model_loading import context_for

    loader, _ = split_loader(tiny_data, "train", context_for(run_dir / "best.pth", None), log=lambda s: None)
    full = image_datasets(tiny_data, build_transforms((0.5,) * 3, (0.5,) * 3, size=32))["train"]
    assert loader.dataset.samples == nested_draw(full.samples, full.classes, 3, seed=0)


# ----------------------------------------------------------------------------- what the network looks at
def test_class_activation_map_has_the_image_size_and_is_not_constant(tiny_run):
    from tl.engine.model_loading import context_for, load_model

    ctx = context_for(tiny_run / "best.pth", None)
    model = load_model(tiny_run / "best.pth", ctx, 2)
    spec = get_backbone("tiny")
    ds = image_datasets(Path(json.loads((tiny_run / "config.json").read_text())["options"]["data"]),
                        build_transforms(spec.mean, spec.std, size=ctx.image_size, augment=False))["val"]
    images = torch.stack([ds[i][0] for i in (0, len(ds) - 1)])  # one image of each class
    maps, predicted, probs = class_activation_maps(model, images)
    assert maps.shape == (2, ctx.image_size, ctx.image_size)
    assert maps.min() >= 0 and maps.max() <= 1
    for m in maps:
        assert m.std() > 0.01  # a map, not a constant
    with torch.no_grad():
        assert predicted.tolist() == model(images).argmax(1).tolist()
        assert torch.allclose(probs, model(images).softmax(1).max(1).values, atol=1e-6)


def test_explain_command_writes_a_map_per_photo(tiny_run, tiny_data, capsys):
    photo = next((tiny_data / "val" / "class_1").iterdir())
    assert main.main(["--explain", str(photo), "--checkpoint", str(tiny_run / "best.pth")]) == 0
    assert (tiny_run / "explain" / f"{photo.stem}-cam.png").is_file()
    assert "predicted class_" in capsys.readouterr().out
    assert main.main(["--explain", str(photo)]) == 2
    assert "--explain needs --checkpoint" in capsys.readouterr().err


def test_explain_with_tta_explains_the_averaged_answer(tiny_run, tiny_data, capsys):
    from tl.engine.explain import mirrored_activation_maps
    from tl.engine.model_loading import context_for, load_model
    from tl.engine.tta import Mirrored

    model = load_model(tiny_run / "best.pth", context_for(tiny_run / "best.pth", None), 2)
    x = torch.randn(2, 3, 32, 32)
    maps, predicted, probs = mirrored_activation_maps(model, x)
    with torch.no_grad():
        averaged = Mirrored(model).eval()(x).softmax(1)
    assert predicted.tolist() == averaged.argmax(1).tolist()
    assert torch.allclose(probs, averaged.max(1).values, atol=1e-6)
    # the two views together: the mirror's map of the mirrored photo is the photo's map mirrored
    flipped, _, _ = mirrored_activation_maps(model, torch.flip(x, dims=[3]))
    assert torch.allclose(flipped, torch.flip(maps, dims=[2]), atol=1e-5)
    photo = next((tiny_data / "val" / "class_1").iterdir())
    assert main.main(["--explain", str(photo), "--checkpoint", str(tiny_run / "best.pth"), "--tta"]) == 0
    assert "test-time augmentation" in capsys.readouterr().out


def test_grad_cam_of_a_frozen_model_still_has_gradients(tiny_backbone):
    model = build_model("tiny", 2, "none")
    set_trainable(model, get_backbone("tiny"), ["head"])  # no body parameter requires a gradient
    maps, _, _ = class_activation_maps(model, torch.randn(2, 3, 32, 32), target=[0, 1])
    assert maps.shape == (2, 32, 32) and torch.isfinite(maps).all()


def test_top_losses_are_the_confident_mistakes_most_confident_first():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.99, 0.01], [0.3, 0.7]])
    labels = [0, 0, 1, 1, 1]  # wrong: 1 (p 0.8), 2 (p 0.6), 3 (p 0.99)
    rows = top_losses(probs, labels)
    assert [r["index"] for r in rows] == [3, 1, 2]
    assert rows[0]["predicted"] == 0 and rows[0]["true"] == 1 and rows[0]["probability"] == pytest.approx(0.99)
    assert top_losses(probs, labels, k=1)[0]["index"] == 3


def test_every_run_folder_gets_top_losses(tiny_run):
    with Image.open(tiny_run / "top_losses.png") as img:
        assert img.format == "PNG" and img.width >= 300


def test_pca_finds_the_direction_of_largest_variance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g) * torch.tensor([10.0, 1, 1, 1, 1])  # variance along axis 0
    coords, explained = pca_2d(x)
    assert coords.shape == (200, 2)
    assert explained[0] > 0.9 and explained[0] >= explained[1]
    assert torch.corrcoef(torch.stack([coords[:, 0], x[:, 0]]))[0, 1].abs() > 0.99


# ----------------------------------------------------------------------------- the summary (torchinfo)
def test_summary_shows_shapes_and_counts_and_changes_nothing(tiny_backbone):
    model = build_model("resnet18", 2, "none")
    set_trainable(model, get_backbone("resnet18"), ["head"])
    model.train()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    text = format_parameter_table(model, (1, 3, 64, 64))
    assert "Trainable params: 1,026" in text and "Total params: 11,177,538" in text
    assert "[1, 512, 1, 1]" in next(line for line in text.splitlines() if "(avgpool)" in line)
    assert next(line for line in text.splitlines() if "(fc)" in line).split()[-1] == "True"
    assert next(line for line in text.splitlines() if "(layer4)" in line).split()[-1] == "False"
    assert "trainable (2 of 62 tensors): fc.weight, fc.bias" in text
    assert model.training  # mode restored
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())  # BatchNorm statistics kept
    assert torch.equal(rng, torch.get_rng_state())  # the run's random stream untouched


# ----------------------------------------------------------------------------- export
@pytest.mark.parametrize("fmt,suffix", [("onnx", ".onnx"), ("torchscript", ".pt")])
def test_export_agrees_with_pytorch_and_predicts_without_config(fmt, suffix, tiny_run, tiny_data, tmp_path, capsys):
    assert main.main(["--export", str(tiny_run), "--format", fmt]) == 0
    exported = tiny_run / f"model{suffix}"
    check = json.loads((tiny_run / f"model{suffix}.check.json").read_text())
    assert check["ok"] and check["images"] == 12 and check["top1_agreement"] == 1.0
    assert check["max_abs_logit_diff"] <= 1e-4
    assert "top-1 agreement 1.0000" in capsys.readouterr().out

    photos = [p for k in (0, 1) for p in sorted((tiny_data / "val" / f"class_{k}").iterdir())[:2]]
    assert main.main(["--predict", *map(str, photos), "--checkpoint", str(tiny_run / "best.pth")]) == 0
    from_pth = capsys.readouterr().out.splitlines()
    alone = tmp_path / "shipped"
    alone.mkdir()
    shutil.copy(exported, alone / exported.name)  # no config.json, no run folder: the file alone
    assert main.main(["--predict", *map(str, photos), "--checkpoint", str(alone / exported.name)]) == 0
    from_file = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in from_file] == [line.split()[1] for line in from_pth]  # same top class
    for a, b in zip(from_pth, from_file):
        assert float(a.split()[2].rstrip(",")) == pytest.approx(float(b.split()[2].rstrip(",")), abs=2e-3)


def test_exported_file_describes_itself(tiny_run):
    from tl.engine.export import load_exported

    assert main.main(["--export", str(tiny_run)]) == 0
    model, meta = load_exported(tiny_run / "model.onnx")
    assert meta["classes"] == ["class_0", "class_1"] and meta["backbone"] == "tiny"
    assert meta["image_size"] == 64 and meta["mean"] == list(get_backbone("tiny").mean)
    assert model(torch.zeros(3, 3, 64, 64)).shape == (3, 2)  # any batch size


def test_export_of_a_run_without_best_pth_is_exit_2(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main.main(["--export", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "best.pth not found" in err and "Traceback" not in err


class EigNet(TinyNet):
    """A forward with an operator ONNX has no counterpart for (a symmetric eigen-solver)."""

    def forward(self, x):
        v = self.pool(self.block(self.stem(x))).flatten(1)  # (B, 16)
        return self.fc(v) + torch.linalg.eigvalsh(v.T @ v)[: self.fc.out_features]


def test_a_model_onnx_cannot_express_is_a_message_and_exit_2(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(BACKBONES, "eig", Backbone("eig", EigNet, head="fc", neck=("block",)))
    run_dir = _train(tiny_data, tmp_path / "runs", "eig")
    assert main.main(["--export", str(run_dir), "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot export this eig model to onnx") and "try --format torchscript" in err
    assert "Traceback" not in err and not (run_dir / "model.onnx").exists()


def test_predict_refuses_an_onnx_file_without_the_description(tmp_path, capsys):
    path = tmp_path / "foreign.onnx"
    torch.onnx.export(nn.Linear(3, 2).eval(), (torch.zeros(1, 3),), str(path), dynamo=True, external_data=False,
                      verbose=False)
    assert main.main(["--predict", "x.png", "--checkpoint", str(path)]) == 2
    assert "without this project's description" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the study scripts, tiny
def test_data_efficiency_quick_writes_table_and_plot_and_notes_a_missing_recipe(tiny_data, tiny_backbone, tmp_path,
                                                                                 capsys):
    import pandas as pd

    from experiments import data_efficiency

    out, runs = tmp_path / "out", tmp_path / "runs"
    argv = ["--data", str(tiny_data), "--backbone", "tiny", "--quick", "--strategies", "resnet_scratch",
            "not_yet_written", "--sizes", "2", "5", "all", "--seeds", "0", "1", "--out", str(out),
            "--runs-dir", str(runs)]
    assert data_efficiency.main(argv) == 0
    assert "recipe 'not_yet_written' does not exist yet" in capsys.readouterr().out
    table = pd.read_csv(out / "data_efficiency.csv", dtype={"images_per_class": str})
    scratch = table[table.strategy == "resnet_scratch"]
    assert (scratch.status == "ok").all() and len(scratch) == 6
    assert dict(zip(scratch.images_per_class, scratch.train_images)) == {"2": 4, "5": 10, "all": 16}  # --quick: 8
    assert (table[table.strategy == "not_yet_written"].status == "not run").all()
    trained = {}  # the images each run trained on: the same subset for both training seeds
    for run, size in zip(scratch.run, scratch.images_per_class):
        config = json.loads((runs / run / "config.json").read_text())
        trained.setdefault(size, set()).add(config["data_fingerprint"])
    assert all(len(prints) == 1 for prints in trained.values())
    with Image.open(out / "data_efficiency.png") as img:
        assert img.width >= 300
    assert "| resnet_scratch | 1 |" in (out / "data_efficiency.md").read_text()

    # a strategy run later joins the table and the other rows stay (the tiny backbone has no
    # ImageNet weights, so the frozen recipe's row says why it did not run)
    assert data_efficiency.main(["--data", str(tiny_data), "--backbone", "tiny", "--quick", "--strategies",
                                 "resnet_frozen", "--sizes", "2", "--seeds", "0", "--out", str(out),
                                 "--runs-dir", str(tmp_path / "runs2")]) == 0
    table = pd.read_csv(out / "data_efficiency.csv")
    assert "ImageNet weights" in table[table.strategy == "resnet_frozen"].reason.iloc[0]
    assert set(table.strategy) == {"resnet_frozen", "not_yet_written", "resnet_scratch"} and len(table) == 13


def test_look_writes_cams_features_and_a_page(tiny_data, tiny_backbone, tmp_path):
    from experiments import look

    frozen = _train(tiny_data, tmp_path / "a", "tiny", "resnet_frozen", "--weights", "none")
    tuned = _train(tiny_data, tmp_path / "b", "tiny", "resnet_finetune", "--weights", "none")
    out = tmp_path / "looking"
    assert look.main(["--frozen", str(frozen), "--finetuned", str(tuned), "--images", "4", "--out", str(out)]) == 0
    for name in ("cams.png", "features.png"):
        with Image.open(out / name) as img:
            assert img.width >= 300
    page = (out / "README.md").read_text()
    assert "![Grad-CAM of both models](cams.png)" in page and "features.png" in page
    assert look.main(["--frozen", str(tmp_path), "--finetuned", str(tuned), "--out", str(out)]) == 2


def test_explain_with_tta_of_a_one_logit_model(tiny_data, tiny_backbone, tmp_path, capsys):
    """vgg_stacked's single logit (BCE): the averaged answer is the mirrored sigmoid's, and its
    probability is that of the class predicted, whichever of the two it is."""
    from tl.engine.explain import class_activation_maps, mirrored_activation_maps
    from tl.engine.model_loading import context_for, load_model
    from tl.engine.tta import Mirrored

    run_dir = _train(tiny_data, tmp_path / "runs", "tiny", "vgg_stacked", "--weights", "none")
    model = load_model(run_dir / "best.pth", context_for(run_dir / "best.pth", None), 2)
    x = torch.randn(3, 3, 32, 32)
    maps, predicted, probs = mirrored_activation_maps(model, x)
    with torch.no_grad():
        p1 = torch.sigmoid(Mirrored(model).eval()(x)[:, 0])  # P(class 1) of the two views averaged
    assert predicted.tolist() == (p1 > 0.5).long().tolist()
    assert torch.allclose(probs, torch.where(predicted == 1, p1, 1 - p1), atol=1e-6)
    assert maps.shape == (3, 32, 32) and torch.isfinite(maps).all() and maps.max() <= 1
    flipped, _, _ = mirrored_activation_maps(model, torch.flip(x, dims=[3]))
    assert torch.allclose(flipped, torch.flip(maps, dims=[2]), atol=1e-5)
    _, single, _ = class_activation_maps(model, x)  # the one-view path takes the single logit too
    with torch.no_grad():
        assert single.tolist() == (model(x)[:, 0] > 0).long().tolist()
    photo = next((tiny_data / "val" / "class_1").iterdir())
    assert main.main(["--explain", str(photo), "--checkpoint", str(run_dir / "best.pth"), "--tta"]) == 0
    assert "predicted class_" in capsys.readouterr().out
