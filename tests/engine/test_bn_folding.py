"""tl/engine/bn_folding.py: folding BatchNorm into the convolution before it gives the same
outputs, leaves the model alone, and copies nothing where there is nothing to fold."""

from __future__ import annotations

import torch

from tl.engine.bn_folding import fold_batchnorm


def test_folding_batchnorm_gives_the_same_outputs_and_leaves_the_model_alone(tiny_backbone):
    from tests.conftest import TinyNet

    torch.manual_seed(0)
    model = TinyNet().eval()
    for bn in (model.stem[1], model.block[1]):  # statistics far from the fresh 0 / 1
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.2, 3), bn.weight.data.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    assert isinstance(model.stem[1], torch.nn.BatchNorm2d)
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    assert fold_batchnorm(plain) is plain  # nothing to fold, nothing copied
