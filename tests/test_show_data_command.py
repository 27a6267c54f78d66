"""`python main.py --show-data`: the augmentation preview and a batch, written as pictures."""

from __future__ import annotations

import main
from tests.helpers import png_size


def test_show_data_writes_the_augmentation_preview_and_a_batch(tiny_data, tmp_path, capsys):
    assert main.main(["--show-data", "--data", str(tiny_data), "--out", str(tmp_path)]) == 0
    width, _ = png_size(tmp_path / "data-preview" / "augmentation.png", min_width=900)  # 9 images in a row
    png_size(tmp_path / "data-preview" / "batch.png")
    assert "augmentation.png" in capsys.readouterr().out
