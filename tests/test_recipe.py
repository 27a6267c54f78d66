"""tl/recipe.py: the criterion a recipe makes, with class weights the inverse class frequency
(tl/engine/balance.py's) in the loss, and a single logit's pos_weight."""

from __future__ import annotations

import pytest
import torch

from tl.engine import balance
from tl.recipe import Recipe, make_criterion


def test_class_weights_are_the_inverse_class_frequency_in_the_loss():
    weights = balance.inverse_frequency([10, 2])  # N = 12, C = 2: 12 / (2 * 10), 12 / (2 * 2)
    assert weights.tolist() == pytest.approx([0.6, 3.0])
    assert balance.inverse_frequency([5, 5, 5]).tolist() == pytest.approx([1, 1, 1])
    logits, labels = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), torch.tensor([0, 1, 1])
    recipe = Recipe(name="r", source="s", strategy="s")
    per_image = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    expected = (per_image * weights[labels]).sum() / weights[labels].sum()  # the weighted mean
    assert make_criterion(recipe, weights)(logits, labels).item() == pytest.approx(expected.item())
    assert make_criterion(recipe)(logits, labels).item() == pytest.approx(per_image.mean().item())
    one = make_criterion(Recipe(name="r", source="s", strategy="s", loss="bce_logit"), weights)
    assert one.pos_weight.tolist() == pytest.approx([10 / 2])  # n_0 / n_1: class 1 is the positive one
