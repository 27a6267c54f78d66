"""TODO."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tl.data import make_loaders
from tl.engine import balance
from tl.engine.options import RunOptions
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


def _labels_of(loader) -> list[int]:
    return [int(t) for _, labels in loader for t in labels]


def test_the_balanced_sampler_draws_every_class_equally_and_repeats_from_its_generator():
    targets = torch.tensor([0] * 40 + [1] * 8)
    data = torch.utils.data.TensorDataset(torch.arange(48.0), targets)
    _, weights = balance.balance(RunOptions(data=Path("d"), balanced_sampler=True), targets, ["a", "b"], log=print)
    generator = torch.Generator().manual_seed(3)
    loader = make_loaders({"train": data}, 8, generator=generator, sample_weights=weights)["train"]
    drawn = [t for _ in range(50) for t in _labels_of(loader)]
    assert len(drawn) == 50 * 48 and 0.45 < np.mean(drawn) < 0.55  # class b: 1/6 of the images, half the draws
    state = generator.get_state()
    next_epoch = _labels_of(loader)
    generator.set_state(state)  # what --resume restores
    assert _labels_of(loader) == next_epoch
    plain = make_loaders({"train": data}, 8, generator=torch.Generator().manual_seed(3))["train"]
    assert sorted(_labels_of(plain)) == targets.tolist()  # without weights: a permutation, as before


