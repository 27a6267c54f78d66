"""tl/engine/explain.py: class-activation maps (of the image's size, not constant, with gradients
through a frozen model), top losses and the 2-D projection of features."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tl.data import build_transforms
from tl.engine.explain import class_activation_maps, pca_2d, top_losses
from tl.engine.selection import image_datasets
from tl.engine.weights import build_model
from tl.models import get_backbone, set_trainable


# ----------------------------------------------------------------------------- what the network looks at
def test_class_activation_map_has_the_image_size_and_is_not_constant(quick_run):
    from tl.engine.model_loading import context_for, load_model

    ctx = context_for(quick_run / "best.pth", None)
    model = load_model(quick_run / "best.pth", ctx, 2)
    spec = get_backbone("tiny")
    ds = image_datasets(Path(json.loads((quick_run / "config.json").read_text())["options"]["data"]),
                        build_transforms(spec.mean, spec.std, size=ctx.image_size, augment=False))["val"]
    images = torch.stack([ds[i][0] for i in (0, len(ds) - 1)])  # one image of each class
    maps, predicted, probs = class_activation_maps(model, images)
    assert maps.shape == (2, ctx.image_size, ctx.image_size)
    assert maps.min() >= 0 and maps.max() <= 1
    for m in maps:
        assert m.std() > 0.01  # a map, not a constant
    with torch.no_grad():
        assert predicted.tolist() == model(images).argmax(1).tolist()
        assert torch.allclose(probs, model(images).softmax(1).max(1).values, atol=1e-6)


def test_grad_cam_of_a_frozen_model_still_has_gradients(tiny_backbone):
    model = build_model("tiny", 2, "none")
    set_trainable(model, get_backbone("tiny"), ["head"])  # no body parameter requires a gradient
    maps, _, _ = class_activation_maps(model, torch.randn(2, 3, 32, 32), target=[0, 1])
    assert maps.shape == (2, 32, 32) and torch.isfinite(maps).all()


def test_top_losses_are_the_confident_mistakes_most_confident_first():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.99, 0.01], [0.3, 0.7]])
    labels = [0, 0, 1, 1, 1]  # wrong: 1 (p 0.8), 2 (p 0.6), 3 (p 0.99)
    rows = top_losses(probs, labels)
    assert [r["index"] for r in rows] == [3, 1, 2]
    assert rows[0]["predicted"] == 0 and rows[0]["true"] == 1 and rows[0]["probability"] == pytest.approx(0.99)
    assert top_losses(probs, labels, k=1)[0]["index"] == 3


def test_pca_finds_the_direction_of_largest_variance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g) * torch.tensor([10.0, 1, 1, 1, 1])  # variance along axis 0
    coords, explained = pca_2d(x)
    assert coords.shape == (200, 2)
    assert explained[0] > 0.9 and explained[0] >= explained[1]
    assert torch.corrcoef(torch.stack([coords[:, 0], x[:, 0]]))[0, 1].abs() > 0.99
