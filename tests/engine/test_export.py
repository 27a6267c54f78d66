"""tl/engine/export.py: an exported model is fed images of the size its run trained at."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from PIL import Image

import main
from tests.conftest import write_image_folder
from tests.helpers import seeded_tiny_net
from tl import TLError
from tl.data import val_resize
from tl.engine import export

FORMATS = ("onnx", "torchscript")
WRONG = [(32, 32), (96, 96), (64, 48), (48, 64)]  # the run trains at 64 (--quick)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> tuple[Path, Path]:
    """A --quick run of the tiny backbone (64-pixel images) exported in both formats; its data folder."""
    from tests.conftest import TinyNet
    from tl.models import BACKBONES, Backbone

    tmp = tmp_path_factory.mktemp("shipped")
    data = write_image_folder(tmp / "data")
    with pytest.MonkeyPatch.context() as m:
        m.setitem(BACKBONES, "tiny", Backbone("tiny", TinyNet, head="fc", neck=("block",)))
        m.setenv("TORCH_HOME", str(tmp / "torch_home"))
        m.setenv("TL_CACHE_DIR", str(tmp / "feature-cache"))
        assert main.main(["-e", "resnet_scratch", "-b", "tiny", "--data", str(data), "--quick", "--out",
                          str(tmp / "runs"), "--no-progress"]) == 0
        (run_dir,) = (tmp / "runs").iterdir()
        for fmt in FORMATS:
            assert main.main(["--export", str(run_dir), "--format", fmt]) == 0
    return run_dir, data


def _file(run_dir: Path, fmt: str) -> Path:
    return run_dir / f"model{export.FORMATS[fmt]}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_exported_file_itself_refuses_another_image_size(shipped, fmt):
    """Loaded by any program, without this project's code: ONNX fixes height and width in its
    graph, TorchScript carries a scripted check (a traced network that pools adaptively would
    take any size and answer for a picture it was not trained on)."""
    path = _file(shipped[0], fmt)
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        run = lambda x: session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]  # noqa: E731
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = torch.jit.load(str(path))
    assert run(torch.zeros(3, 3, 64, 64)).shape == (3, 2)
    for h, w in WRONG:
        with pytest.raises(Exception, match="64" if fmt == "torchscript" else None):
            run(torch.zeros(1, 3, h, w))


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_exported_model_refuses_another_size_in_this_project_too(shipped, fmt):
    model, meta = export.load_exported(_file(shipped[0], fmt))
    assert meta["image_size"] == model.image_size == 64
    for h, w in WRONG:
        with pytest.raises(TLError, match=f"takes 64x64 images, the size its run trained at, not {h}x{w}"):
            model(torch.zeros(1, 3, h, w))


def _edited(source: Path, target: Path, size: int) -> Path:
    """A copy of the exported file whose description records another image size (and its resize)."""
    change = lambda m: json.dumps(m | {"image_size": size, "resize": val_resize(size)})  # noqa: E731
    if source.suffix == ".onnx":
        proto = onnx.load(str(source))
        meta = json.loads({p.key: p.value for p in proto.metadata_props}[export.META_KEY])
        onnx.helper.set_model_props(proto, {export.META_KEY: change(meta)})
        onnx.save(proto, str(target))
        return target
    extra = {export.META_KEY + ".json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(source), _extra_files=extra)
        torch.jit.save(module, str(target), _extra_files={export.META_KEY + ".json":
                                                          change(json.loads(extra[export.META_KEY + ".json"]))})
    return target


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("size", [32, 96, 65])
def test_a_description_edited_to_another_size_is_refused(shipped, tmp_path, capsys, fmt, size):
    """--predict resizes photos to the size the description records; a description that records
    another size than the graph takes is refused (one error line), so it is never fed silently."""
    edited = _edited(_file(shipped[0], fmt), tmp_path / f"edited{export.FORMATS[fmt]}", size)
    photo = shipped[1] / "val" / "class_0" / "000.png"
    capsys.readouterr()
    assert main.main(["--predict", str(photo), "--checkpoint", str(edited)]) == 2
    out, err = capsys.readouterr()
    assert not out and err.startswith(f"error: {edited}: its description") and len(err.strip().splitlines()) == 1
    assert f"the model does not take {size}x{size} images" in err


@pytest.mark.parametrize("fmt", FORMATS)
def test_predict_resizes_photos_of_any_size_to_the_recorded_size(shipped, tiny_backbone, tmp_path, fmt):
    """Photos of other sizes than the run's 64 pixels (smaller, larger, not square) are resized
    as the run's val transform does: the exported file gives best.pth's probabilities."""
    run_dir, _ = shipped
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for w, h in [(40, 40), (64, 64), (130, 90), (50, 120)]:
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(photos / f"{w}x{h}.png")
    tables = {}
    for name, checkpoint in (("pth", run_dir / "best.pth"), (fmt, _file(run_dir, fmt))):
        assert main.main(["--predict", str(photos), "--checkpoint", str(checkpoint), "--csv",
                          str(tmp_path / f"{name}.csv"), "--workers", "0", "--no-progress"]) == 0
        tables[name] = pd.read_csv(tmp_path / f"{name}.csv")
    assert tables[fmt][["path", "prediction"]].equals(tables["pth"][["path", "prediction"]])
    assert np.allclose(tables[fmt].iloc[:, 2:], tables["pth"].iloc[:, 2:], atol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_evaluate_refuses_an_exported_file_naming_predict(shipped, tiny_backbone, capsys, fmt):
    run_dir, data = shipped
    path = _file(run_dir, fmt)
    capsys.readouterr()
    assert main.main(["--evaluate", str(path), "--data", str(data), "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"error: {path} is a model exported with --export ({fmt}), not saved weights: --predict")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in out + err


def test_parity_check_compares_the_model_with_the_exported_file(tmp_path):
    model = seeded_tiny_net(1).eval()
    other = copy.deepcopy(model)
    with torch.no_grad():  # the same network with its logits negated: every top-1 class differs
        other.fc.weight.neg_(), other.fc.bias.neg_()
    example = torch.zeros(2, 3, 32, 32)
    meta = {"format": export.FORMAT, "classes": [f"c{i}" for i in range(1000)], "backbone": "tiny",  # TinyNet: 1000
            "image_size": 32, "resize": 37, "mean": [0.5] * 3, "std": [0.5] * 3, "single_logit": False}
    export._export_torchscript(other, example, meta, tmp_path / "other.pt")
    export._export_torchscript(model, example, meta, tmp_path / "same.pt")
    torch.manual_seed(0)
    loader = [(torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)) for _ in range(2)]

    exported_other, _ = export.load_exported(tmp_path / "other.pt")
    check = export.parity_check(model, exported_other, loader)
    assert check["images"] == 8
    assert not check["ok"]
    assert check["top1_agreement"] < 1 and check["max_abs_logit_diff"] > export.TOLERANCE

    exported_same, _ = export.load_exported(tmp_path / "same.pt")
    check = export.parity_check(model, exported_same, loader)
    assert check["ok"] and check["top1_agreement"] == 1.0
