"""tl/engine/tta.py: the mirror at test time (--tta, Recipe.tta) averages a photo's and its
mirror's probabilities, checked against numbers computed here by hand, for a softmax and a
one-logit head and an exported file; stored features have no mirror."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.helpers import two_class_tiny_net
from tl.engine import export, tta
from tl.engine.evaluate import class_probabilities

pytestmark = pytest.mark.usefixtures("own_cache_dir")  # every test: a feature-cache folder of its own


# ----------------------------------------------------------------------------- the mirror at test time
class LeftRight(nn.Module):
    """Logits from the mean brightness of the left and right halves: a mirror swaps them."""

    def __init__(self, outputs: int):
        super().__init__()
        self.outputs = outputs

    def forward(self, x):
        left, right = x[..., : x.shape[-1] // 2].mean((1, 2, 3)), x[..., x.shape[-1] // 2:].mean((1, 2, 3))
        z = torch.stack([3 * left + right, left - 2 * right], 1)
        return z if self.outputs == 2 else z[:, :1] - z[:, 1:]


def test_the_mirror_averages_the_softmax_probabilities_of_both_views():
    x = torch.zeros(2, 3, 4, 4)
    x[0, :, :, :2], x[1, :, :, 2:] = 1.0, 0.5  # bright on the left; dimmer on the right
    left, right = x[..., :2].mean((1, 2, 3)), x[..., 2:].mean((1, 2, 3))
    plain = torch.stack([3 * left + right, left - 2 * right], 1)
    mirrored = torch.stack([3 * right + left, right - 2 * left], 1)  # the halves swap places
    expected = (plain.softmax(1) + mirrored.softmax(1)) / 2
    got = class_probabilities(tta.Mirrored(LeftRight(2))(x))
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, plain.softmax(1), atol=1e-2)  # the mirror changed something


def test_a_single_logit_averages_the_sigmoid_probabilities_and_stays_finite():
    x = torch.zeros(3, 3, 4, 4)
    x[0, :, :, :2], x[1, :, :, 2:] = 1.0, -0.5
    x[2, :, :, :2], x[2, :, :, 2:] = 80.0, -80.0  # each view certain, of the other class
    left, right = x[..., :2].mean((1, 2, 3)), x[..., 2:].mean((1, 2, 3))
    z, z_mirror = 2 * left + 3 * right, 2 * right + 3 * left  # (3l + r) - (l - 2r), and mirrored
    expected = (torch.sigmoid(z) + torch.sigmoid(z_mirror)) / 2
    out = tta.Mirrored(LeftRight(1))(x)
    assert out.shape == (3, 1) and torch.isfinite(out).all()
    assert torch.allclose(class_probabilities(out)[:, 1], expected, atol=1e-6)
    assert expected[2] == 0.5
    loss = nn.functional.binary_cross_entropy_with_logits(out, torch.tensor([[1.0], [0.0], [1.0]]))
    assert torch.isfinite(loss)


def test_stored_features_have_no_mirror():
    with pytest.raises(Exception, match="needs images"):
        tta.Mirrored(nn.Linear(4, 2))(torch.zeros(2, 4))


def test_an_exported_file_is_mirrored_by_running_it_on_flipped_images(tmp_path):
    net = two_class_tiny_net().eval()
    meta = {"format": export.FORMAT, "classes": ["a", "b"], "backbone": "tiny", "image_size": 16, "resize": 18,
            "mean": [0.5] * 3, "std": [0.25] * 3, "single_logit": False, "exported_from": "runs/r/best.pth"}
    export._export_onnx(net, torch.zeros(2, 3, 16, 16), meta, tmp_path / "m.onnx")
    exported, _ = export.load_exported(tmp_path / "m.onnx")
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(tta.Mirrored(exported)(x), tta.Mirrored(net)(x), atol=1e-5)
        assert not torch.allclose(tta.Mirrored(net)(x), net(x).log_softmax(1), atol=1e-4)
