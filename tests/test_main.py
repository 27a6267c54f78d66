"""The command line: messages and exit statuses, and one real end-to-end run."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import commands
import main
from tl.engine.options import RunOptions

ROOT = Path(__file__).resolve().parents[1]


def test_list_names_every_recipe(capsys):
    assert main.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in ("resnet_scratch", "resnet_finetune", "resnet_frozen", "resnet_bn_only", "vgg_transfer",
                 "vgg_finetune", "efficientnet_lite0"):
        assert name in out


def test_unknown_experiment_is_one_line_and_status_2(capsys, tiny_data):
    assert main.main(["--experiment", "resnet_fancy", "--data", str(tiny_data)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown experiment 'resnet_fancy'") and "Traceback" not in err


def test_run_options_are_declared_once():
    """Every option is a RunOptions field under its own name (its dest), or belongs to an action
    or a command; left out, the run options give exactly RunOptions' defaults."""
    parser = main.build_parser()
    not_run = {"help", "experiment", "list", "resume", "evaluate", "predict", "explain", "export", "prepare",
               "show_data", "src", "dest", "force", "split", "checkpoint", "format", "quick", "csv", "find_lr"}
    assert {a.dest for a in parser._actions} - not_run <= {f.name for f in dataclasses.fields(RunOptions)}
    args = parser.parse_args(["-e", "resnet_finetune", "--data", "somewhere"])
    assert commands.run_options(args) == RunOptions(data=Path("somewhere"))


def test_bad_values_exit_2(capsys):
    for argv in (["-e", "vgg_finetune", "--epochs", "0"], ["-e", "vgg_finetune", "--lr-scale", "-1"],
                 ["-e", "vgg_finetune", "--batch-size", "many"], []):
        with pytest.raises(SystemExit) as info:
            main.main(argv)
        assert info.value.code == 2
    assert main.main(["-e", "vgg_finetune", "--backbone", "alexnet9", "--data", "."]) == 2
    assert "unknown backbone 'alexnet9'" in capsys.readouterr().err


def test_missing_data_folder(capsys, tmp_path):
    assert main.main(["-e", "resnet_scratch", "--data", str(tmp_path / "nowhere")]) == 2
    assert "data folder not found" in capsys.readouterr().err


def test_offline_torchvision_backbone_stops_before_training(capsys, tiny_data, tmp_path):
    code = main.main(["-e", "vgg_finetune", "--data", str(tiny_data), "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2
    assert "ImageNet weights for vgg16 are not available" in err and "vgg16-397923af.pth" in err
    assert "--backbone efficientnet_lite0" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_a_subprocess_run_without_network_prints_the_message():
    # the real entry point, in a fresh interpreter with TL_OFFLINE (no download attempt)
    env = dict(os.environ, TL_OFFLINE="1", TORCH_HOME=str(ROOT / "tests" / "no-such-cache"))
    proc = subprocess.run([sys.executable, "main.py", "-e", "resnet_finetune", "--data", "tests"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr


def test_quick_run_writes_config_and_history(tiny_data, tiny_backbone, tmp_path, capsys):
    assert main.main(["-e", "resnet_scratch", "-b", "tiny", "--data", str(tiny_data), "--quick",
                      "--out", str(tmp_path / "runs"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("resnet_scratch-tiny-")
    last = out.strip().splitlines()[-1]
    assert last.startswith("headline acc") and "(val, final epoch)" in last and "best val acc" in last
    assert str(run_dir) in out
    config = json.loads((run_dir / "config.json").read_text())
    assert config["recipe"]["lrs"] == {"all": 1e-4} and config["results"]["best_epoch"] >= 0
    history = pd.read_csv(run_dir / "history.csv")
    assert list(history.phase) == ["val", "train", "val"]
    assert {"best.pth", "last.ckpt"} <= {p.name for p in run_dir.iterdir()}


@pytest.mark.slow
def test_frozen_efficientnet_on_hymenoptera_reaches_85_percent(hymenoptera, tmp_path, capsys):
    """End to end on real photos, through main.py: 2 training epochs of the frozen recipe."""
    code = main.main(["-e", "resnet_frozen", "--backbone", "efficientnet_lite0", "--data", str(hymenoptera),
                      "--epochs", "2", "--workers", "0", "--out", str(tmp_path / "runs"), "--no-progress"])
    assert code == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    results = json.loads((run_dir / "config.json").read_text())["results"]
    assert results["baseline_val_acc"] < 0.75  # the random head knows nothing yet
    assert results["best_val_acc"] >= 0.85
    assert "skipped" not in capsys.readouterr().out  # hymenoptera's .gif is simply not an image file


def test_list_prints_the_readme_table_and_what_runs_offline(capsys):
    # a cached torchvision file counts as offline; conftest's TORCH_HOME is an empty temporary folder
    from tl.engine.weights import torchvision_weights_file

    cached = torchvision_weights_file("resnet18")[1]
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert main.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "resnet18, random init" in out and "vgg16, ImageNet" in out
    assert "command: python main.py -e vgg_finetune" in out and "trains:" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert lines["efficientnet_lite0"].split()[1] == "yes:" and lines["resnet18"].split()[1] == "yes:"
    assert lines["vgg16"].split()[1] == "no:" and "vgg16-397923af.pth" in lines["vgg16"]


def _failing_download(calls):
    def download(url, download_root, **kwargs):  # what an offline torchvision download leaves behind
        calls.append(url)
        Path(download_root).mkdir(parents=True, exist_ok=True)
        (Path(download_root) / "hymenoptera_data.zip").write_bytes(b"partial")
        raise OSError("network access is blocked in tests")
    return download


def test_first_readme_command_offline_stops_on_weights_before_data(capsys, tmp_path, monkeypatch):
    # `python main.py --experiment vgg_finetune` with no data and no network
    calls = []
    monkeypatch.setattr("torchvision.datasets.utils.download_and_extract_archive", _failing_download(calls))
    monkeypatch.chdir(tmp_path)
    assert main.main(["--experiment", "vgg_finetune"]) == 2
    err = capsys.readouterr().err
    assert "ImageNet weights for vgg16 are not available" in err and "Traceback" not in err
    assert calls == [] and not (tmp_path / "data").exists()  # no data download was tried


def test_a_failed_data_download_leaves_no_empty_data_folder(capsys, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("torchvision.datasets.utils.download_and_extract_archive", _failing_download(calls))
    monkeypatch.chdir(tmp_path)
    assert main.main(["--experiment", "resnet_scratch"]) == 2  # random init: no weights needed, so data fails
    assert "could not be downloaded" in capsys.readouterr().err and len(calls) == 1
    assert not (tmp_path / "data").exists()
    (tmp_path / "data").mkdir()  # a data/ the user made stays, only the partial archive goes
    (tmp_path / "data" / "mine.txt").write_text("keep")
    assert main.main(["--experiment", "resnet_scratch"]) == 2
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["mine.txt"]


def test_a_torch_torchvision_mismatch_is_one_line_before_torchvision_is_imported(monkeypatch, capsys):
    from importlib import metadata

    versions = {"torch": "2.14.1", "torchvision": "0.24.1"}
    monkeypatch.setattr(metadata, "version", lambda name: versions[name])
    assert main.main(["--list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: torchvision 0.24.1 does not match torch 2.14.1") and err.count("\n") == 1
    assert "torchvision==0.29" in err
    versions["torchvision"] = "0.29.1+cpu"
    assert main.main(["--list"]) == 0
