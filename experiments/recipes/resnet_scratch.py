"""ResNet18 from scratch: how far do 244 photos get a network that has never seen an image?

Document 003 §3 ("내장 모델 사용하기 (Transfer Learning 안함)"): `models.resnet18(pretrained=False)`,
Adam lr 1e-4, batch 8, 10 epochs that all train (003's loop has no validation-only
epoch, so its `EPOCHS = 10` maps to `train_epochs=10` here plus our epoch-0 baseline).
The document reports 66% on hymenoptera after 10 epochs: the control that every
pretrained recipe is measured against. With `--backbone` the same question is asked of
another architecture: random init, everything trains.
"""

import torch

from tl.models import param_groups, set_trainable
from tl.recipe import Recipe

RECIPE = Recipe(
    name="resnet_scratch",
    source="003 §3",
    strategy="random init, every layer trains",
    weights="none",  # the point of the experiment: no ImageNet knowledge
    lrs={"all": 1e-4},
    train_epochs=10,
    batch_size=8,
)


def build(model, spec, recipe):
    set_trainable(model, spec, ["body", "neck", "head"])
    return model, torch.optim.Adam(param_groups(model, spec, recipe.lrs))
