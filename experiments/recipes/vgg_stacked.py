"""A stacked one-logit head: keep all of VGG19, ImageNet classifier included, add Linear(1000, 1).

Document 004 §3 (`MyModel`): `self.pretrained_model = models.vgg19(pretrained=True)`,
`self.dense = nn.Linear(1000, 1)`, everything frozen except `dense`. One logit separates
two classes: sigmoid(logit) is P(class 1), trained with `BCEWithLogitsLoss`, predicted as
class 1 when the logit is above 0 (sigmoid > 0.5). A data set with more classes stops
with a clear message.

The document's own freezing code has a typo, `p.requres_grad = True`, which creates a new
attribute and leaves `dense` frozen too: nothing would train (docs/ERRATA.md #9).
004 gives no optimizer, learning rate or epoch count: Adam lr 1e-3 (001's head-only
choice), batch 32 and 5 training epochs (plus our epoch-0 baseline).
"""

import torch

from tl.recipe import Recipe

RECIPE = Recipe(
    name="vgg_stacked",
    source="004 §3",
    strategy="ImageNet init, whole network frozen, a new Linear(1000, 1) on its logits trains (BCE)",
    backbone="vgg19",  # 004's choice
    lrs={"head": 1e-3},  # not given in 004
    train_epochs=5,  # not given in 004
    batch_size=32,
    frozen_bn_eval=True,  # no effect on VGG19; keeps the strategy exact on BN backbones
    loss="bce_logit",
    stack_head=True,
)


def build(model, spec, recipe):
    model.requires_grad_(False)  # everything, ImageNet classifier included
    model.dense.requires_grad_(True)  # 004 meant this: `requires_grad`, not `requres_grad`
    return model, torch.optim.Adam([{"name": "head", "lr": recipe.lrs["head"], "params": model.dense.parameters()}])
