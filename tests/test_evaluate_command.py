"""`python main.py --evaluate PATH`: a weights file or a folder of epoch files scored on a split of
the data the run recorded, with the run's own selection of images (its val split, its
--train-per-class draw), its mirror (--tta) unless told otherwise, and its recorded digests;
a malformed or hand-edited config.json, or other data, is one error line and exit status 2."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest
import torch

import main
from experiments import get_experiment
from tests.conftest import write_image_folder
from tests.helpers import class_folders_only, cli_exit, train_frozen, train_one_epoch, train_scratch
from tl.engine.evaluate import EPOCH_FILE
from tl.engine.options import RunOptions
from tl.engine.run import run
from tl.engine.weights import build_model


def test_evaluate_reads_the_data_and_the_split_from_the_run(tmp_path, tiny_backbone, capsys):
    d = class_folders_only(tmp_path / "d", {"a": 12, "b": 12})
    assert train_one_epoch(capsys, d, tmp_path / "runs", "--val-split", "0.25", "--split-seed", "3")[0] == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    code, out, _ = cli_exit(capsys, "--evaluate", run_dir / "best.pth")  # no --data, no --backbone
    assert code == 0 and f"data: {d} (from the run's config.json)" in out and "(6 images)" in out


DEEP = '{"a":' * 100_000 + "1" + "}" * 100_000  # JSON nested deeper than Python's parser goes
NOT_UTF8 = b'{"recipe": "caf\xe9"}'


@pytest.mark.parametrize("config", ["{not json", "[]", '{"recipe": {}}', DEEP, "[" * 50_000, NOT_UTF8])
def test_a_malformed_config_beside_a_checkpoint(trained_run, tiny_data, capsys, config):
    write = (trained_run / "config.json").write_bytes if isinstance(config, bytes) else (
        trained_run / "config.json").write_text
    write(config)
    for argv in (["--evaluate", trained_run / "best.pth", "--data", tiny_data],
                 ["--predict", tiny_data / "val" / "class_0" / "000.png", "--checkpoint", trained_run / "best.pth"]):
        code, _, err = cli_exit(capsys, *argv)
        assert code == 2 and "config.json is not a run config this project wrote" in err
    code, _, err = cli_exit(capsys, "--resume", trained_run / "last.ckpt", "--epochs", "3")  # resume reads it first
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


def test_a_config_with_wrong_types_is_a_message(tmp_path, tiny_backbone, capsys):
    d = write_image_folder(tmp_path / "d")
    assert train_one_epoch(capsys, d, tmp_path / "runs")[0] == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    config = json.loads((run_dir / "config.json").read_text())
    for field, value in (("checksums", "abc"), ("options", {**config["options"], "val_split": "x"})):
        (run_dir / "config.json").write_text(json.dumps({**config, field: value}))
        code, _, err = cli_exit(capsys, "--evaluate", run_dir / "best.pth", "--data", d)
        assert code == 2 and "not a run config" in err, field


def test_evaluate_a_file_and_a_folder_of_epochs(tiny_data, tiny_backbone, tmp_path, capsys):
    run_dir = train_scratch(tiny_data, tmp_path / "runs", 3, "--save-every-epoch")
    assert main.main(["--evaluate", str(run_dir / "best.pth"), "--data", str(tiny_data)]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "confusion matrix" in out and "class_1" in out
    assert main.main(["--evaluate", str(run_dir), "--data", str(tiny_data)]) == 0
    table = pd.read_csv(run_dir / "eval_val.csv")
    assert list(table.epoch) == [0, 1, 2, 3]
    history = pd.read_csv(run_dir / "history.csv")
    val = history[history.phase == "val"].set_index("epoch").acc
    assert table.set_index("epoch").acc.round(6).to_dict() == val.round(6).to_dict()  # same weights, same score


def test_evaluate_reports_mismatches(tiny_data, tiny_backbone, three_class_data, tmp_path, capsys):
    run_dir = train_scratch(tiny_data, tmp_path / "runs", 1)
    assert main.main(["--evaluate", str(run_dir / "best.pth"), "--data", str(three_class_data)]) == 2
    assert "trained on classes" in capsys.readouterr().err
    torch.save(build_model("tiny", 3, "none").state_dict(), tmp_path / "three.pth")
    assert main.main(["--evaluate", str(tmp_path / "three.pth"), "--backbone", "tiny",
                      "--data", str(tiny_data)]) == 2
    assert "different sizes: probably another number of classes" in capsys.readouterr().err
    assert main.main(["--evaluate", str(tmp_path / "three.pth"), "--backbone", "resnet18",
                      "--data", str(tiny_data)]) == 2
    assert "another architecture" in capsys.readouterr().err


@pytest.mark.usefixtures("own_cache_dir")
def test_evaluating_the_train_split_of_another_folder_says_what_went_wrong(tiny_data, tiny_backbone, tmp_path,
                                                                          capsys):
    """A --train-per-class 3 run, scored with --evaluate --split train --data SMALL (2 images a
    class): the message says the split cannot be scored as the run saw it, and does not tell
    the user to choose a smaller --train-per-class, an option --evaluate does not take."""
    from tests.conftest import write_image_folder

    small = write_image_folder(tmp_path / "small", train=2, val=2, seed=1)
    module = get_experiment("resnet_finetune")
    opts = RunOptions(data=tiny_data, backbone="tiny", weights="none", epochs=1, batch_size=4, workers=0,
                      out=tmp_path / "runs", image_size=32, progress=False, plots=False, train_per_class=3)
    result = run(module.RECIPE, module.build, opts, log=lambda s: None)
    code = main.main(["--evaluate", str(result.run_dir / "best.pth"), "--split", "train", "--data", str(small)])
    err = capsys.readouterr().err
    assert code == 2
    assert "choose a smaller number" not in err and "cannot be scored as the run saw it" in err, err


def test_informative_checkpoint_names_parse_and_evaluate_in_epoch_order(tiny_data, tiny_backbone, tmp_path):
    assert main.main(["-e", "resnet_scratch", "-b", "tiny", "--data", str(tiny_data), "--epochs", "2",
                      "--save-every-epoch", "--informative-names", "--out", str(tmp_path / "runs"),
                      "--no-progress", "--workers", "0"]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    names = sorted(p.name for p in run_dir.glob("epoch*.pth"))
    assert len(names) == 3
    m = EPOCH_FILE.match(names[1])
    assert m and int(m.group(1)) == 1 and 0 <= float(m.group(3)) <= 1
    assert EPOCH_FILE.match("07.pth").group(1) == "07" and not EPOCH_FILE.match("best.pth")
    assert main.main(["--evaluate", str(run_dir), "--data", str(tiny_data)]) == 0
    import pandas as pd

    table = pd.read_csv(run_dir / "eval_val.csv")
    assert list(table.epoch) == [0, 1, 2]
    assert table.acc.round(4).tolist() == [float(EPOCH_FILE.match(n).group(3)) for n in table.file]


@pytest.mark.usefixtures("own_cache_dir")
def test_evaluating_a_run_file_checks_its_recorded_digest(tiny_data, pretrained, tmp_path, capsys):
    run_dir = train_frozen(tiny_data, tmp_path / "runs", 2, "--save-every-epoch", weights=pretrained)
    config = json.loads((run_dir / "config.json").read_text())
    assert set(config["checksums"]) == {"best.pth", "00.pth", "01.pth", "02.pth"}
    best = config["results"]["best_epoch"]
    assert config["checksums"]["best.pth"] == config["checksums"][f"{best:02d}.pth"]
    os.replace(run_dir / "00.pth", run_dir / "best.pth") if best != 0 else os.replace(run_dir / "01.pth",
                                                                                      run_dir / "best.pth")
    assert main.main(["--evaluate", str(run_dir / "best.pth"), "--data", str(tiny_data)]) == 2
    assert "damaged or was replaced" in capsys.readouterr().err


@pytest.mark.usefixtures("own_cache_dir")
def test_evaluate_and_predict_use_the_recorded_mirror_unless_told(tiny_data, tiny_backbone, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main.main(["-e", "resnet_scratch", "-b", "tiny", "--data", str(tiny_data), "--out", str(out), "--quick",
                      "--tta", "--no-progress"]) == 0
    (run_dir,) = out.iterdir()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["recipe"]["tta"] is True and config["results"]["headline"] == "val, final epoch, mirror averaged"
    capsys.readouterr()
    printed = {}
    for flag in ([], ["--no-tta"]):  # the run's recorded value, then turned off
        assert main.main(["--evaluate", str(run_dir / "best.pth"), *flag]) == 0
        printed[bool(flag)] = capsys.readouterr().out
    assert "test-time augmentation" in printed[False] and "test-time augmentation" not in printed[True]
    loss = {k: next(line for line in v.splitlines() if line.startswith("loss")) for k, v in printed.items()}
    assert loss[False] != loss[True]
    assert (run_dir / "evaluate-best-val-tta").is_dir() and (run_dir / "evaluate-best-val").is_dir()
    tables = {}
    for flag in ([], ["--no-tta"]):
        table = tmp_path / f"table{len(flag)}.csv"
        assert main.main(["--predict", str(tiny_data / "val"), "--checkpoint", str(run_dir / "best.pth"),
                          "--csv", str(table), "--workers", "0", "--no-progress", *flag]) == 0
        tables[bool(flag)] = table.read_text()
    assert tables[False] != tables[True]
