"""ResNet with only BatchNorm and the head trainable: adapt the statistics, keep the filters.

Document 000 (cats vs dogs): "freeze every layer's parameters except the BatchNorm layers,
which were trained with ImageNet's mean and standard deviation", and replace the
classifier. The convolution filters stay as ImageNet learned them; each BatchNorm layer's
scale and shift (and, in train mode, its running statistics) adapt to the new images.
That is about 9.6 k trainable parameters in ResNet18's body plus the head.

000 gives no optimizer, learning rate or epoch count, so this recipe chooses them: Adam at
lr 1e-3, the default of Adam and the rate 001 (5-19..5-22) trains its frozen ResNet18's head
with, since here too only a few parameters train; batch 32 as in 001; 10 training epochs as
003's ResNet recipes (plus our epoch-0 baseline). BatchNorm layers here are
trainable, so `frozen_bn_eval` does not apply to them: they run in train mode.
"""

import torch

from tl import TLError
from tl.models import param_groups, set_trainable, unfreeze_batchnorm
from tl.recipe import Recipe

RECIPE = Recipe(
    name="resnet_bn_only",
    source="000",
    strategy="ImageNet init, BatchNorm layers and the new head train",
    lrs={"all": 1e-3},  # not given in 000
    train_epochs=10,
    batch_size=32,
)


def train_batchnorm(model, spec, recipe) -> None:
    """Make every BatchNorm layer's weight (scale) and bias (shift) trainable
    (`tl.models.unfreeze_batchnorm`; experiments/bn_policy.py trains them the same way). A network
    without BatchNorm (ConvNeXt and ViT normalise with LayerNorm) stops here, before any
    training: the recipe would silently train its head alone."""
    if not unfreeze_batchnorm(model):
        raise TLError(f"{recipe.name} trains the BatchNorm layers and the head, but {spec.name} has no BatchNorm "
                      f"layer (it normalises otherwise, e.g. with LayerNorm): choose a backbone with BatchNorm, "
                      f"or resnet_frozen to train the head alone")


def build(model, spec, recipe):
    set_trainable(model, spec, ["head"])
    train_batchnorm(model, spec, recipe)
    return model, torch.optim.Adam(param_groups(model, spec, recipe.lrs))
