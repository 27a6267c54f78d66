"""Unbalanced classes: `--class-weights auto` and `--balanced-sampler`, and the warning that
points to them.

A model trained on 900 dogs and 100 cats learns that "dog" is usually right: its loss
is mostly about dogs. Two standard answers, each one line in the core:

* **class weights** in the loss (`tl.recipe.make_criterion`): class c's images weigh
  w_c = N / (C * n_c) (scikit-learn's "balanced": the inverse class frequency, scaled so
  that balanced data gets weights 1). The cats' loss then counts as much as the dogs'.
  A single-logit head takes the ratio as `pos_weight` = w_1 / w_0 = n_0 / n_1.
* **a balanced sampler** (`tl.data.make_loaders`): each epoch draws N training images with
  replacement, image i with weight 1 / n_c(i), so every class is drawn equally often: the
  100 cats are seen about 5 times each, 450 of the dogs once. It draws from the run's
  seeded generator, which the checkpoint saves, so a resumed run draws the same images;
  under torchrun every process takes its share of one such draw (`tl.engine.distributed`).

Both leave val and test alone: they change what the model learns, not how it is scored
(the classification report, tl/engine/metrics.py, shows per-class recall and balanced
accuracy beside the accuracy).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch

from tl import TLError
from tl.engine.class_names import one_line

IMBALANCE = 3  # training classes differing in size by more than this factor are reported at the start


def class_counts(targets, n_classes: int) -> list[int]:
    counts = Counter(int(t) for t in targets)
    return [counts[c] for c in range(n_classes)]


def inverse_frequency(counts: list[int]) -> torch.Tensor:
    """w_c = N / (C * n_c): 1 for every class of a balanced set."""
    n = torch.tensor(counts, dtype=torch.float32)
    return n.sum() / (len(counts) * n)


def balance(opts, targets, classes: list[str], log: Callable[[str], None] = print
            ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(the loss's class weights or None, the sampler's per-image weights or None) that `opts`
    ask for, from the training labels `targets`; reports a training set whose classes differ
    in size by more than IMBALANCE x. Refuses the options where they mean nothing."""
    if opts.class_weights not in (None, "auto"):
        raise TLError(f"--class-weights takes 'auto' (the inverse class frequency), not {opts.class_weights!r}")
    asked = [name for name, on in (("--class-weights", opts.class_weights), ("--balanced-sampler",
                                                                             opts.balanced_sampler)) if on]
    if asked and len(classes) < 2:
        raise TLError(f"{' and '.join(asked)} balance classes against each other, and {opts.data} has one class "
                      f"({classes[0] if classes else 'none'}): leave {' and '.join(asked)} out")
    counts = class_counts(targets, len(classes))
    if min(counts) > 0 and max(counts) > IMBALANCE * min(counts):
        sizes = one_line(", ".join(f"{name} {n}" for name, n in zip(classes, counts)))  # a name's \n shown as \\n
        log(f"note: the training classes differ in size by more than {IMBALANCE}x ({sizes}): accuracy will flatter "
            f"a model that favours the large classes. "
            + (f"Balancing with {' and '.join(asked)}." if asked else "To balance them, try --class-weights auto "
               "(the loss) or --balanced-sampler (the draw); the classification report shows per-class recall."))
    loss_weights = inverse_frequency(counts) if opts.class_weights == "auto" else None
    per_class = 1.0 / torch.tensor(counts, dtype=torch.double).clamp(min=1)
    sample_weights = per_class[torch.as_tensor([int(t) for t in targets])] if opts.balanced_sampler else None
    return loss_weights, sample_weights
