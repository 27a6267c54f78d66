"""Bad input, third round (issue 25): a hand-edited exported file, a resume on another
thread count, names that differ only in their Unicode form, and Ctrl-C's exit status
(two comparisons at once: tests/test_compare.py; the distributed banner: tests/test_distributed.py).

As in tests/test_bad_input.py, each test builds its input itself and checks the exact
outcome: the exit status, one `error:` line that names the problem, no traceback."""

from __future__ import annotations

import json
import unicodedata
import warnings

import onnx
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

import main
from tests.conftest import TinyNet, write_image_folder
from tl.data import build_transforms, val_resize
from tl.engine import class_names, export, feature_store, resume, run_folder
from tl.engine.selection import image_datasets

MEAN = (0.5, 0.5, 0.5)


def cli(capsys, *argv) -> tuple[int, str, str]:
    """main.main(argv) -> (exit status, stdout, stderr); never a traceback."""
    code = main.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


# ----------------------------------------------------------------------------- 5. an exported file edited by hand
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


def _edit(source, target, change) -> None:
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


EDITS = {  # name: (what the edit does to the description, what the message must say)
    "a key missing": (lambda m: {k: v for k, v in m.items() if k != "mean"}, "mean is missing"),
    "classes a string": (lambda m: m | {"classes": "ant,bee"}, "classes is str"),
    "image_size a string": (lambda m: m | {"image_size": "32"}, "image_size is str"),
    "single_logit a number": (lambda m: m | {"single_logit": 1}, "single_logit is int"),
    "std of 2 numbers": (lambda m: m | {"std": [0.2, 0.2]}, "std must be 3 numbers"),
    "std of 0": (lambda m: m | {"std": [0.2, 0.0, 0.2]}, "std must be 3 numbers (R, G, B) above 0"),
    "resize for another size": (lambda m: m | {"resize": 40}, "image_size 32 and resize 40 do not fit"),
    "an image size the graph refuses": (lambda m: m | {"image_size": 8, "resize": val_resize(8)},
                                        "the model does not take 8x8"),
    "more classes than outputs": (lambda m: m | {"classes": ["ant", "bee", "wasp"]},
                                  "names 3 classes but the model has 2 output(s)"),
    "fewer classes than outputs": (lambda m: m | {"classes": ["ant"]}, "classes must be 2 or more"),
    "the same class twice": (lambda m: m | {"classes": ["ant", "ant"]}, "distinct names"),
    "a single logit claimed": (lambda m: m | {"single_logit": True}, "single_logit is true, which needs 1 output"),
    "another format": (lambda m: m | {"format": "tl-reference export 9"}, "format is 'tl-reference export 9'"),
    "a list, not an object": (lambda m: [m], "a JSON list, not an object"),
    "not JSON": (lambda m: "{classes: ant", "is not JSON"),
}


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_an_edited_export_description_is_one_message_and_exit_2(exported, fmt, tmp_path, capsys):
    files, photo = exported
    code, out, _ = cli(capsys, "--predict", photo, "--checkpoint", files[2, fmt])
    assert code == 0 and out.startswith(f"{photo}: ")  # the file as exported predicts
    for name, (change, says) in EDITS.items():
        if name == "an image size the graph refuses" and fmt == "torchscript":
            continue  # a traced TinyNet pools adaptively: it takes any size (ONNX fixed 32x32 in the graph)
        edited = tmp_path / f"edited{files[2, fmt].suffix}"
        _edit(files[2, fmt], edited, change)
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
        _edit(files[1, fmt], edited, change)
        code, _, err = cli(capsys, "--predict", photo, "--checkpoint", edited)
        assert code == 2 and says in err, err


# ----------------------------------------------------------------------------- 6. resume on another thread count
def test_a_resume_on_another_thread_count_trains_on_the_recorded_one(tmp_path, tiny_backbone, capsys):
    data = write_image_folder(tmp_path / "d", train=16, val=8)
    base = ["-e", "resnet_finetune", "-b", "tiny", "--data", data, "--weights", "none", "--quick", "--no-progress"]
    torch.set_num_threads(2)
    assert cli(capsys, *base, "--epochs", "2", "--out", tmp_path / "full")[0] == 0
    assert cli(capsys, *base, "--epochs", "1", "--out", tmp_path / "half")[0] == 0
    ((full,), (half,)) = (tmp_path / "full").iterdir(), (tmp_path / "half").iterdir()
    assert json.loads((half / "config.json").read_text())["threads"] == 2
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 would
    code, out, _ = cli(capsys, "--resume", half / "last.ckpt", "--epochs", "2", "--no-progress")
    assert code == 0 and "CPU threads: 2, as the run was trained (this process had 1)" in out
    assert torch.get_num_threads() == 2
    figures = [pd.read_csv(run / "history.csv").drop(columns=["seconds", "images_per_s"]) for run in (full, half)]
    pd.testing.assert_frame_equal(*figures, check_exact=True)  # exactly the uninterrupted run


def test_an_old_checkpoint_without_a_thread_count_resumes_on_this_one(tmp_path, capsys):
    config = {"options": {}}
    torch.set_num_threads(1)
    lines = []
    resume.restore_threads(config, lines.append)
    assert torch.get_num_threads() == 1 and config["threads"] == 1 and "does not say how many" in lines[0]


def test_the_feature_cache_key_follows_the_cpu_thread_count(tiny_data):
    ds = image_datasets(tiny_data, build_transforms(MEAN, MEAN, size=32, augment=False))["val"]
    keys = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        keys[threads] = {device: feature_store.cache_key("d", ds, feature_store.FeaturePass(
            views=1, random_views=False, seed=0, workers=0, dtype=torch.float32, device=device, channels_last=False,
            folded=False)) for device in ("cpu", "cuda")}
    assert keys[1]["cpu"] != keys[2]["cpu"]  # CPU features computed on another count differ in the last bits
    assert keys[1]["cuda"] == keys[2]["cuda"]  # a GPU's do not depend on the CPU's threads


# ----------------------------------------------------------------------------- 7. messages that show the difference
def test_a_class_named_in_two_unicode_forms_is_shown_how_it_differs(tmp_path, tiny_backbone, capsys):
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    root = write_image_folder(tmp_path / "d")
    (root / "train" / "class_1").rename(root / "train" / nfc)
    (root / "val" / "class_1").rename(root / "val" / nfd)  # as a folder copied from a Mac may be
    if {p.name for p in (root / "val").iterdir()} != {"class_0", nfd}:
        pytest.skip("this file system normalises names")
    code, _, err = cli(capsys, "-e", "resnet_scratch", "-b", "tiny", "--data", root, "--out", tmp_path / "runs",
                       "--no-progress")
    assert code == 2 and "class folders differ between phases" in err
    assert "'café' differs only in its Unicode form: train spells it NFC (U+0063 U+0061 U+0066 U+00E9), " \
           "val NFD (U+0063 U+0061 U+0066 U+0065 U+0301)" in err
    assert "class_0" not in err.split("\n", 1)[1]  # only the names that differ are explained
    assert class_names.how_names_differ(["a", "b"], ["a", "c"], "x", "y") == ""  # names that differ visibly: no note


def test_ctrl_c_in_training_exits_130_with_the_command_that_resumes(tmp_path, tiny_backbone, capsys, monkeypatch):
    write = run_folder.write_history_csv

    def ctrl_c_after_epoch_1(history, path):
        write(history, path)
        if history.rows[-1]["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(run_folder, "write_history_csv", ctrl_c_after_epoch_1)
    code, _, err = cli(capsys, "-e", "resnet_scratch", "-b", "tiny", "--data", write_image_folder(tmp_path / "d"),
                       "--out", tmp_path / "runs", "--epochs", "2", "--quick", "--no-progress")
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert code == 130  # the shell's status for Ctrl-C, not 2 ("your input")
    assert err.startswith("error: interrupted:")
    assert f"continue with: python main.py --resume {run_dir}/last.ckpt" in err
    monkeypatch.setattr(run_folder, "write_history_csv", write)
    assert cli(capsys, "--resume", run_dir / "last.ckpt", "--no-progress")[0] == 0  # the hint works as printed
    assert pd.read_csv(run_dir / "history.csv").epoch.max() == 2
