"""tl/engine/balance.py: the balanced sampler draws every class equally and repeats its draws from
its generator (the class weights in the loss: tests/test_recipe.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tl.data import make_loaders
from tl.engine import balance
from tl.engine.options import RunOptions


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


