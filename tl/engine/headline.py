"""The run's headline number: one model scored on images that played no part in choosing it.

`score_headline` picks the model and the split (test with the epoch chosen on val, else val
with the final epoch), scores it, and writes the per-image predictions to
`headline_predictions.csv`; `Headline` is what the number and the run's pictures show.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tl.engine.options import RunOptions
from tl.engine.tables import write_table
from tl.engine.tta import Mirrored
from tl.loop import History


@dataclass
class Headline:
    """The headline model's predictions on the headline split: what the number and the pictures show."""

    record: dict  # headline, headline_acc, test_acc: what config.json's results hold
    evaluation: dict  # tl.engine.evaluate.evaluate's result: predictions, probabilities, confusion
    images: object  # the data set scored (its images, in the order of the predictions)


def score_headline(net: nn.Module, model: nn.Module, history: History, val_inputs, val_set, test_set,
                   classes: list[str], opts: RunOptions, device: torch.device, run_dir: Path,
                   tta: bool = False) -> Headline:
    """The run's headline accuracy, scored on images that played no part in choosing it.

    The best val epoch is chosen on val, so its val accuracy flatters it (the maximum of
    noisy numbers). Two honest numbers instead:

    * a data folder with a `test/` split: the epoch chosen on val (best.pth, the one early
      stopping keeps) scored on test, which nothing has looked at;
    * no test split: the final epoch's val accuracy. The epoch count comes from the recipe's
      document, not from val, so nothing was selected on these images.

    `net` must still hold the final epoch's weights (the loop's own net: with cached val
    features it scores them, the same numbers as the loop's last val row). The per-image
    predictions go to `headline_predictions.csv` (path relative to the data folder, label,
    prediction), which a paired comparison of two recipes resamples (experiments/report.py).

    With an average of the weights (--ema) `net` and best.pth are the average's weights: the
    model scored is the one val scored and best.pth holds. With `tta` (the recipe's, decided
    before training, never on these images) each image and its mirror are scored and their
    probabilities averaged (tl/engine/tta.py): then val is read as images, not stored features.
    """
    from tl.engine.evaluate import evaluate

    if test_set is not None:  # scanned with train and val at the start of the run
        if history.best_state is not None:
            model.load_state_dict(history.best_state)  # the best-on-val state that run() hands back too
        what, scored, inputs, images = "test, epoch chosen on val", model, test_set, test_set
    else:
        what, scored, inputs, images = "val, final epoch", net, val_inputs, val_set
    if tta:
        what, scored, inputs = f"{what}, mirror averaged", Mirrored(scored), images
    result = evaluate(scored, torch.utils.data.DataLoader(inputs, batch_size=32), device, len(classes))
    rows = [{"path": Path(os.path.relpath(path, opts.data)).as_posix(), "label": classes[label],
             "prediction": classes[p]} for (path, label), p in zip(images.samples, result["predictions"])]
    write_table(run_dir / "headline_predictions.csv", rows, ["path", "label", "prediction"])
    acc = sum(r["label"] == r["prediction"] for r in rows) / len(rows)
    record = {"headline": what, "headline_acc": acc, "test_acc": acc if what.startswith("test") else None}
    return Headline(record, result, images)
