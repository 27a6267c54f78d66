"""ResNet18 as a frozen feature extractor: only the new `fc` learns.

Document 001, listings 5-16 to 5-22: every parameter gets `requires_grad = False`, then
`model.fc = nn.Linear(512, 2)` (new, so trainable), `optim.Adam(params_to_update)` with
Adam's default lr 1e-3, batch 32, `num_epochs=13` (001's loop trains in every epoch, so
13 training epochs here, plus our epoch-0 baseline). 1,026 parameters train out of 11.2 M.

Frozen BatchNorm: 001's training function never calls `model.eval()` on the body, so in
the document the frozen network's BatchNorm layers still *update their running mean and
variance* on every training batch: the "frozen" features drift. Here `frozen_bn_eval=True`
keeps those layers in eval mode, so the body is truly fixed (and its features can be
cached, see tl/features.py). Document 003 also runs this variant (Adam lr 1e-4, batch 8,
10 epochs; 59% with its BN drifting): run it with `--lr-scale 0.1 --batch-size 8 --epochs 10`.
"""

import torch

from tl.models import param_groups, set_trainable
from tl.recipe import Recipe

RECIPE = Recipe(
    name="resnet_frozen",
    source="001 5-16..5-22",
    strategy="ImageNet init, frozen body (BN in eval mode), only the new head trains",
    lrs={"head": 1e-3},  # torch.optim.Adam's default, which 001 relies on
    train_epochs=13,
    batch_size=32,
    frozen_bn_eval=True,
)


def build(model, spec, recipe):
    set_trainable(model, spec, ["head"])
    return model, torch.optim.Adam(param_groups(model, spec, recipe.lrs))
