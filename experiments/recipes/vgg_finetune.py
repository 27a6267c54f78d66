"""VGG16 fine-tuning with three learning rates: the further from the output, the gentler.

Document 002 §1.4: every parameter trains, in three SGD groups (momentum 0.9):

    features                      lr 1e-4   generic filters: nudge them
    classifier.0, classifier.3    lr 5e-4   the hidden fully connected layers
    classifier.6                  lr 1e-3   the new output layer: learns from zero

Here those are the backbone's named groups body / neck / head (tl/models.py), so the
same three-rate idea runs on any backbone with `--backbone`. Batch 32, `num_epochs=2`
in 002's loop = one validation-only epoch + one training epoch (`train_epochs=1`).
002's own listing of this loop has the forward pass outside the batch loop, so it
trains on the last batch only (docs/ERRATA.md); the one loop here does not.
"""

import torch

from tl.models import param_groups, set_trainable
from tl.recipe import Recipe

RECIPE = Recipe(
    name="vgg_finetune",
    source="002 §1.4",
    strategy="ImageNet init, everything trains: features 1e-4 / classifier.0,3 5e-4 / classifier.6 1e-3",
    backbone="vgg16",
    lrs={"body": 1e-4, "neck": 5e-4, "head": 1e-3},  # features / classifier.0,.3 / classifier.6
    train_epochs=1,  # 002: num_epochs=2, epoch 0 validates only
    batch_size=32,
)


def build(model, spec, recipe):
    set_trainable(model, spec, ["body", "neck", "head"])
    return model, torch.optim.SGD(param_groups(model, spec, recipe.lrs), momentum=0.9)
