"""experiments/look.py: class-activation maps, feature projections and a page."""

from __future__ import annotations

from PIL import Image

from tests.helpers import train_three_epochs


def test_look_writes_cams_features_and_a_page(tiny_data, tiny_backbone, tmp_path):
    from experiments import look

    frozen = train_three_epochs(tiny_data, tmp_path / "a", "tiny", "resnet_frozen", "--weights", "none")
    tuned = train_three_epochs(tiny_data, tmp_path / "b", "tiny", "resnet_finetune", "--weights", "none")
    out = tmp_path / "looking"
    assert look.main(["--frozen", str(frozen), "--finetuned", str(tuned), "--images", "4", "--out", str(out)]) == 0
    for name in ("cams.png", "features.png"):
        with Image.open(out / name) as img:
            assert img.width >= 300
    page = (out / "README.md").read_text()
    assert "![Grad-CAM of both models](cams.png)" in page and "features.png" in page
    assert look.main(["--frozen", str(tmp_path), "--finetuned", str(tuned), "--out", str(out)]) == 2
