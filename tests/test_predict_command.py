"""`python main.py --predict IMAGE... / DIR`: single photos named with the run's classes (or
ImageNet's), a folder of photos classified into a table (also by an exported model alone), and
bad input (a folder with no photos, an existing table, an exported file whose description was
edited by hand): one error line, exit status 2, nothing written."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

import main
from tests.conftest import TinyNet, write_image_folder
from tests.helpers import cli, train_quick
from tl.data import val_resize
from tl.engine import export
from tl.engine.class_names import one_line


@pytest.fixture
def photo_run(tmp_path, tiny_backbone) -> Path:
    return train_quick(write_image_folder(tmp_path / "data"), tmp_path / "runs")


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


# ----------------------------------------------------------------------------- a photo or a few
def test_predict_with_a_checkpoint_uses_the_runs_class_names(hymenoptera, tmp_path, capsys):
    assert main.main(["-e", "resnet_frozen", "-b", "efficientnet_lite0", "--data", str(hymenoptera), "--quick",
                      "--out", str(tmp_path / "runs"), "--no-progress"]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    bee = next((hymenoptera / "val" / "bees").glob("*.jpg"))
    (tmp_path / "broken.jpg").write_text("not a picture")
    code = main.main(["--predict", str(bee), str(tmp_path / "broken.jpg"), "--checkpoint", str(run_dir / "best.pth")])
    out = capsys.readouterr()
    assert code == 2  # one image could not be read: said clearly, the other still classified
    line = next(x for x in out.out.splitlines() if x.startswith(str(bee)))
    named = dict(item.rsplit(" ", 1) for item in line.removeprefix(f"{bee}: ").split(", "))
    assert set(named) == {"ants", "bees"}  # the run's two classes, not ImageNet's names
    assert sum(map(float, named.values())) == pytest.approx(1, abs=2e-3)
    assert "cannot read" in out.out and "1 of 2 image(s)" in out.err
    assert [x for x in (out.out + out.err).splitlines() if x.startswith("error:")] == \
        ["error: 1 of 2 image(s) could not be read"]  # one error: line; the photo's own line says skipped


def test_predict_without_a_checkpoint_names_imagenet_classes(hymenoptera, capsys):
    bees = sorted((hymenoptera / "val" / "bees").glob("*.jpg"))[:3]
    assert main.main(["--predict", *map(str, bees), "--backbone", "efficientnet_lite0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # each image's top 3 ImageNet classes (names from torchvision's metadata, not the file path)
    top3 = [[item.rsplit(" ", 1)[0] for item in line.split(": ", 1)[1].split(", ")] for line in lines]
    assert len(top3) == 3 and sum("bee" in names for names in top3) >= 2  # class 309


CLASS_EDITS = [  # of a run's class names ["café", "class_1", "class_2"]
    lambda c: [c[1], c[0], c[2]],  # two names swapped
    lambda c: [c[0], "class_9", c[2]],  # one renamed
    lambda c: c[:2],  # one removed
    lambda c: c + ["class_9"],  # an extra one
    lambda c: ["cafe\u0301", *c[1:]],  # the trained name in another Unicode form (the trained one is NFC)
]


def test_class_names_edited_in_config_json_are_refused_by_predict_and_evaluate(tmp_path, tiny_backbone, capsys):
    """config.json's class names must be, in order, those the weights were trained with (as last.ckpt
    records them): any other list would name every prediction wrongly. One error line with both lists."""
    data = write_image_folder(tmp_path / "data", classes=3, train=4, val=2)
    (data / "train" / "class_0").rename(data / "train" / "caf\u00e9")
    (data / "val" / "class_0").rename(data / "val" / "caf\u00e9")
    run_dir = train_quick(data, tmp_path / "runs")
    config = json.loads((run_dir / "config.json").read_text())
    trained = config["classes"]
    assert trained == ["caf\u00e9", "class_1", "class_2"]
    photo = next((data / "val" / "class_1").iterdir())
    for edit in CLASS_EDITS:
        edited = edit(trained)
        (run_dir / "config.json").write_text(json.dumps(config | {"classes": edited}))
        for argv in (["--predict", photo, "--checkpoint", run_dir / "best.pth"], ["--evaluate", run_dir / "best.pth"]):
            code, out, err = cli(capsys, *argv)
            assert code == 2 and len(err.strip().splitlines()) == 1, err
            assert f"names the classes {edited}, but the run trained with {trained}" in err, err
    assert "differs only in its Unicode form" in err  # the last edit: names that print alike
    # the fields the run fixed and reading its model depends on: its image size, backbone, loss, TTA, split
    recipe, options = config["recipe"], config["options"]
    for section, key, value in (("options", "image_size", 9), ("options", "image_size", options["image_size"] * 2),
                                ("recipe", "backbone", "resnet18"), ("recipe", "tta", not recipe["tta"]),
                                ("recipe", "loss", "bce_logit"), ("options", "val_split", 0.5)):
        (run_dir / "config.json").write_text(json.dumps(config | {section: config[section] | {key: value}}))
        for argv in (["--predict", photo, "--checkpoint", run_dir / "best.pth"], ["--evaluate", run_dir / "best.pth"]):
            code, out, err = cli(capsys, *argv)
            assert code == 2 and len(err.strip().splitlines()) == 1, err
            assert f"says {section}.{key} = {value!r}, but the run trained with {config[section][key]!r}" in err, err
    (run_dir / "config.json").write_text(json.dumps(config))
    assert cli(capsys, "--predict", photo, "--checkpoint", run_dir / "best.pth")[0] == 0


# ----------------------------------------------------------------------------- a folder in, a table out
def test_a_folder_of_photos_becomes_a_table(photo_run, tmp_path, capsys):
    from tl.engine.model_loading import context_for, load_model
    from tl.engine.predict import predict_images
    from tl.models import get_backbone

    photos = _photo_folder(tmp_path / "photos")
    out = tmp_path / "out"
    assert main.main(["--predict", str(photos), "--checkpoint", str(photo_run / "best.pth"), "--out", str(out),
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
    ctx = context_for(photo_run / "best.pth", None)
    spec = get_backbone("tiny")
    one = photos / rows.path[0]
    ((_, top),) = predict_images(load_model(photo_run / "best.pth", ctx, 2), [one], ["class_0", "class_1"], spec.mean,
                                 spec.std, ctx.image_size, top=1)
    assert rows.loc[0, f"p_{top[0][0]}"] == pytest.approx(top[0][1], abs=1e-6)

    # --csv FILE, and never over an existing file. The promise across batch sizes: the same photos
    # and classes, probabilities within float32 rounding (a batch of another shape may take another
    # kernel and round differently in the last bit); at one batch size, bit for bit.
    assert main.main(["--predict", str(photos), "--checkpoint", str(photo_run / "best.pth"), "--csv",
                      str(tmp_path / "mine.csv"), "--workers", "0", "--no-progress"]) == 0
    mine = pd.read_csv(tmp_path / "mine.csv")
    assert mine[["path", "prediction"]].equals(rows[["path", "prediction"]])
    probabilities = ["p_class_0", "p_class_1"]
    assert mine[probabilities].to_numpy() == pytest.approx(rows[probabilities].to_numpy(), abs=1e-5)
    assert main.main(["--predict", str(photos), "--checkpoint", str(photo_run / "best.pth"), "--csv",
                      str(tmp_path / "again.csv"), "--batch-size", "3", "--workers", "0", "--no-progress"]) == 0
    assert pd.read_csv(tmp_path / "again.csv").equals(rows)
    capsys.readouterr()
    before = table.read_bytes()
    assert main.main(["--predict", str(photos), "--checkpoint", str(photo_run / "best.pth"), "--csv", str(table)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --csv") and "exists already" in err and len(err.strip().splitlines()) == 1
    assert table.read_bytes() == before


def test_an_exported_model_alone_classifies_a_folder(photo_run, tmp_path):
    photos = write_image_folder(tmp_path / "photos", train=3, phases=("train",), seed=3)
    assert main.main(["--export", str(photo_run), "--format", "torchscript"]) == 0
    alone = tmp_path / "shipped"
    alone.mkdir()
    shutil.copy(photo_run / "model.pt", alone / "model.pt")  # no config.json beside it
    tables = {}
    for name, checkpoint in (("pth", photo_run / "best.pth"), ("pt", alone / "model.pt")):
        assert main.main(["--predict", str(photos), "--checkpoint", str(checkpoint), "--csv",
                          str(tmp_path / f"{name}.csv"), "--workers", "0", "--no-progress"]) == 0
        tables[name] = pd.read_csv(tmp_path / f"{name}.csv")
    assert tables["pt"].path.tolist() == tables["pth"].path.tolist()
    assert tables["pt"].prediction.tolist() == tables["pth"].prediction.tolist()
    assert np.allclose(tables["pt"].iloc[:, 2:], tables["pth"].iloc[:, 2:], atol=1e-5)


HOSTILE_NAMES = ["ant\nqueen", "bee\x1b[31m red", "wasp\r=\u202eevil"]  # LF, a colour escape, CR and a bidi mark


def test_names_with_line_feeds_and_terminal_escapes_print_on_their_own_lines(tmp_path, tiny_backbone, capsys):
    """Class and file names holding a line feed, a carriage return, a terminal's escape sequence or
    a bidi mark: the imbalance note, the scan's note on an unreadable image, --predict IMAGE and
    DIR, --evaluate and --explain print each name as its escape (\\n, \\x1b), so each line
    stays one line and the terminal is not driven by a name."""
    data = write_image_folder(tmp_path / "data", classes=len(HOSTILE_NAMES), train=2, val=2)
    for k, name in enumerate(HOSTILE_NAMES):
        for phase in ("train", "val"):
            (data / phase / f"class_{k}").rename(data / phase / name)
    for extra in range(6):  # the first class four times larger: the imbalance note names every class
        shutil.copy(data / "train" / HOSTILE_NAMES[0] / "000.png", data / "train" / HOSTILE_NAMES[0] / f"x{extra}.png")
    photos = tmp_path / "photos"
    shutil.copytree(data / "val", photos)
    photo = photos / HOSTILE_NAMES[1] / "000.png"
    (data / "train" / HOSTILE_NAMES[1] / f"cut{HOSTILE_NAMES[2]}.png").write_bytes(b"\x89PNG not really")
    run = train_quick(data, tmp_path / "runs")
    trained = capsys.readouterr().out
    note = [line for line in trained.splitlines() if line.startswith("note: the training classes differ")]
    assert len(note) == 1 and all(one_line(n) in note[0] for n in HOSTILE_NAMES), trained
    assert [line for line in trained.splitlines() if f"cut{one_line(HOSTILE_NAMES[2])}.png" in line], trained
    code, evaluated, _ = cli(capsys, "--evaluate", run / "best.pth", "--data", data, "--no-progress")
    assert code == 0 and all(f"  {one_line(n)} " in evaluated for n in HOSTILE_NAMES), evaluated
    code, explained, _ = cli(capsys, "--explain", photo, "--checkpoint", run / "best.pth")
    assert code == 0 and len(explained.splitlines()) == 1, explained
    trained += evaluated + explained
    code, one, _ = cli(capsys, "--predict", photo, "--checkpoint", run / "best.pth")
    assert code == 0
    code, folder, _ = cli(capsys, "--predict", photos, "--checkpoint", run / "best.pth", "--csv", tmp_path / "t.csv",
                          "--no-progress")
    assert code == 0
    out = one + folder
    lines = out.splitlines()
    assert len(lines) == 3 and lines[0].startswith(one_line(photo) + ": "), out  # the photo, then the folder's two
    assert all(one_line(n) in lines[0] for n in HOSTILE_NAMES), out  # every class's probability
    assert lines[2].startswith("predicted classes: ") and any(one_line(n) in lines[2] for n in HOSTILE_NAMES), out
    assert not [c for c in trained + out if c in "\r\x1b\u202e"], "a raw control character reached the terminal"


def test_predicting_a_folder_refuses_bad_input_before_writing(photo_run, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("no photos here")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    photos = write_image_folder(tmp_path / "photos", train=1, phases=("train",))
    best = str(photo_run / "best.pth")
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


# ----------------------------------------------------------------------------- an exported file as the model
EDITS = {  # name: (what the edit does to the description, what the message must say)
    "a key missing": (lambda m: {k: v for k, v in m.items() if k != "mean"}, "mean is missing"),
    "classes a string": (lambda m: m | {"classes": "ant,bee"}, "classes is str"),
    "image_size a string": (lambda m: m | {"image_size": "32"}, "image_size is str"),
    "single_logit a number": (lambda m: m | {"single_logit": 1}, "single_logit is int"),
    "std of 2 numbers": (lambda m: m | {"std": [0.2, 0.2]}, "std = [0.2, 0.2] is not 3 numbers"),
    "std of 0": (lambda m: m | {"std": [0.2, 0.0, 0.2]}, "is not 3 numbers (R, G, B) (each > 0"),
    "resize for another size": (lambda m: m | {"resize": 40}, "image_size 32 and resize 40 do not fit"),
    "an image size the graph refuses": (lambda m: m | {"image_size": 8, "resize": val_resize(8)},
                                        "the model does not take 8x8"),
    "more classes than outputs": (lambda m: m | {"classes": ["ant", "bee", "wasp"]},
                                  "names 3 classes but the model has 2 output(s)"),
    "fewer classes than outputs": (lambda m: m | {"classes": ["ant"]}, "is not a list of 2 or more"),
    "the same class twice": (lambda m: m | {"classes": ["ant", "ant"]}, "distinct names"),
    "a single logit claimed": (lambda m: m | {"single_logit": True}, "single_logit is true, which needs 1 output"),
    "another format": (lambda m: m | {"format": "tl-reference export 9"}, "format is 'tl-reference export 9'"),
    "a list, not an object": (lambda m: [m], "a JSON list, not an object"),
    "not JSON": (lambda m: "{classes: ant", "is not JSON"),
}


def _edit_description(source, target, change) -> None:
    """A copy of the exported file whose description went through `change(dict) -> dict or text`."""
    if source.suffix == ".onnx":
        proto = onnx.load(str(source))
        meta = json.loads({p.key: p.value for p in proto.metadata_props}[export.META_KEY])
        new = change(meta)
        onnx.helper.set_model_props(proto, {export.META_KEY: new if isinstance(new, str) else json.dumps(new)})
        onnx.save(proto, str(target))
        return
    extra = {export.META_KEY + ".json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation
        module = torch.jit.load(str(source), _extra_files=extra)
        new = change(json.loads(extra[export.META_KEY + ".json"]))
        torch.jit.save(module, str(target), _extra_files={export.META_KEY + ".json": new if isinstance(new, str)
                                                          else json.dumps(new)})


def _described(outputs: int, classes: list[str], single_logit: bool = False) -> dict:
    return {"format": export.FORMAT, "classes": classes, "backbone": "tiny", "image_size": 32,
            "resize": val_resize(32), "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "single_logit": single_logit,
            "exported_from": "runs/r/best.pth"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 2-class and a single-logit TinyNet exported to ONNX and TorchScript, and a photo."""
    tmp = tmp_path_factory.mktemp("exported")
    files = {}
    for outputs in (2, 1):
        torch.manual_seed(0)
        net = TinyNet()
        net.fc = nn.Linear(16, outputs)
        example = torch.zeros(2, 3, 32, 32)
        meta = _described(outputs, ["ant", "bee"], single_logit=outputs == 1)
        files[outputs, "onnx"] = tmp / f"out{outputs}.onnx"
        export._export_onnx(net.eval(), example, meta, files[outputs, "onnx"])
        files[outputs, "torchscript"] = tmp / f"out{outputs}.pt"
        export._export_torchscript(net.eval(), example, meta, files[outputs, "torchscript"])
    Image.new("RGB", (40, 40), (200, 40, 40)).save(tmp / "photo.png")
    return files, tmp / "photo.png"


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_an_edited_export_description_is_one_message_and_exit_2(exported, fmt, tmp_path, capsys):
    files, photo = exported
    code, out, _ = cli(capsys, "--predict", photo, "--checkpoint", files[2, fmt])
    assert code == 0 and out.startswith(f"{photo}: ")  # the file as exported predicts
    for name, (change, says) in EDITS.items():
        if name == "an image size the graph refuses" and fmt == "torchscript":
            continue  # a traced TinyNet pools adaptively: it takes any size (ONNX fixed 32x32 in the graph)
        edited = tmp_path / f"edited{files[2, fmt].suffix}"
        _edit_description(files[2, fmt], edited, change)
        code, out, err = cli(capsys, "--predict", photo, "--checkpoint", edited)
        assert code == 2 and not out, name
        assert err.startswith(f"error: {edited}: its description") and says in err, (name, err)
        assert len(err.strip().splitlines()) == 1, name


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_a_single_logit_export_is_two_classes(exported, fmt, tmp_path, capsys):
    files, photo = exported
    code, out, _ = cli(capsys, "--predict", photo, "--checkpoint", files[1, fmt])
    assert code == 0 and {name.rstrip(",") for name in out.split()[1::2]} == {"ant", "bee"}
    for change, says in ((lambda m: m | {"single_logit": False}, "set single_logit true, with 2 classes"),
                         (lambda m: m | {"classes": ["ant", "bee", "wasp"]}, "needs 1 output and 2 classes")):
        edited = tmp_path / f"edited{files[1, fmt].suffix}"
        _edit_description(files[1, fmt], edited, change)
        code, _, err = cli(capsys, "--predict", photo, "--checkpoint", edited)
        assert code == 2 and says in err, err


def test_predict_refuses_an_onnx_file_without_the_description(tmp_path, capsys):
    path = tmp_path / "foreign.onnx"
    torch.onnx.export(nn.Linear(3, 2).eval(), (torch.zeros(1, 3),), str(path), dynamo=True, external_data=False,
                      verbose=False)
    assert main.main(["--predict", "x.png", "--checkpoint", str(path)]) == 2
    assert "without this project's description" in capsys.readouterr().err
