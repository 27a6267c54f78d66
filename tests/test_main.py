"""main.py: the parser and the wrapper every command runs in: bad values exit 2, the real entry
point in a fresh interpreter prints one message and no traceback, TL_DEBUG=1 shows the
traceback, and a torch / torchvision mismatch is one line before torchvision is imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import main
from tl import TLError

ROOT = Path(__file__).resolve().parents[1]


def test_bad_values_exit_2(capsys):
    for argv in (["-e", "vgg_finetune", "--epochs", "0"], ["-e", "vgg_finetune", "--lr-scale", "-1"],
                 ["-e", "vgg_finetune", "--batch-size", "many"], []):
        with pytest.raises(SystemExit) as info:
            main.main(argv)
        assert info.value.code == 2
    assert main.main(["-e", "vgg_finetune", "--backbone", "alexnet9", "--data", "."]) == 2
    assert "unknown backbone 'alexnet9'" in capsys.readouterr().err


def test_a_subprocess_run_without_network_prints_the_message():
    # the real entry point, in a fresh interpreter with TL_OFFLINE (no download attempt)
    env = dict(os.environ, TL_OFFLINE="1", TORCH_HOME=str(ROOT / "tests" / "no-such-cache"))
    proc = subprocess.run([sys.executable, "main.py", "-e", "resnet_finetune", "--data", "tests"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr


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


def test_tl_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("TL_DEBUG", "1")
    with pytest.raises(TLError, match="data folder not found"):
        main.main(["-e", "resnet_scratch", "--data", str(tmp_path / "nowhere")])
    assert "TL_DEBUG=1" in main.build_parser().format_help()


@pytest.mark.parametrize("argv, place", [
    (["-e", "resnet_frozen", "--out", "x"], "--out"),
    (["--show-data", "--out", "x"], "--out"),
    (["--predict", "photos", "--checkpoint", "best.pth", "--csv", "t.csv"], "--csv"),
    (["--prepare", "dogs-vs-cats", "--src", "s", "--dest", "d"], "--dest"),
    (["--resume", "r/last.ckpt"], "--resume the copy's last.ckpt"),
    (["--evaluate", "r/best.pth"], "run the command on the copy"),
    (["--export", "r"], "run the command on the copy"),
])
def test_a_failed_write_names_the_commands_own_output_option(argv, place):
    assert place in main._outputs(main.build_parser().parse_args(argv))
