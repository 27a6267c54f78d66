"""Bad input for issue 23's features (a review's findings): each test builds its input and checks
the outcome, correct work or one `error:` line with exit status 2, never a traceback."""

from __future__ import annotations

import pytest
from torch import nn

import main
from tests.conftest import TinyNet
from tl.models import BACKBONES, Backbone


def cli(capsys, *argv) -> tuple[int, str, str]:
    """main.main(argv) -> (exit status, stdout, stderr); never a traceback."""
    code = main.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


class WideKernelNet(TinyNet):
    """TinyNet whose first layer is a 20-pixel kernel without padding: it cannot take 16-pixel images."""

    def __init__(self):
        super().__init__()
        self.stem[0] = nn.Conv2d(3, 8, 20)


@pytest.fixture
def wide_kernel(monkeypatch) -> str:
    monkeypatch.setitem(BACKBONES, "wide", Backbone("wide", WideKernelNet, head="fc", neck=("block",)))
    return "wide"


def test_an_image_size_too_small_for_the_backbone_is_refused_before_training(tiny_data, wide_kernel, tmp_path,
                                                                            capsys):
    code, out, err = cli(capsys, "-e", "resnet_frozen", "--data", tiny_data, "-b", wide_kernel, "--weights", "none",
                         "--quick", "--image-size", 16, "--out", tmp_path / "runs", "--no-progress")
    assert code == 2 and err.startswith("error: wide cannot take 16-pixel images"), err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
