"""ResNet with only BatchNorm and the head trainable: adapt the statistics, keep the filters.

Document 000 (cats vs dogs): "freeze every layer's parameters except the BatchNorm layers,
which were trained with ImageNet's mean and standard deviation", and replace the
classifier. The convolution filters stay as ImageNet learned them; each BatchNorm layer's
scale and shift (and, in train mode, its running statistics) adapt to the new images.
That is about 9.6 k trainable parameters in ResNet18's body plus the head.

000 gives no optimizer, learning rate or epoch count; DESIGN.md fixes Adam lr 1e-3,
batch 32, 10 training epochs (plus our epoch-0 baseline). BatchNorm layers here are
trainable, so `frozen_bn_eval` does not apply to them: they run in train mode.
"""

import torch

from tl.models import BATCHNORM, param_groups, set_trainable
from tl.recipe import Recipe

RECIPE = Recipe(
    name="resnet_bn_only",
    source="000",
    strategy="ImageNet init, BatchNorm layers and the new head train",
    lrs={"all": 1e-3},  # not given in 000
    train_epochs=10,
    batch_size=32,
)


def build(model, spec, recipe):
    set_trainable(model, spec, ["head"])
    for module in model.modules():
        if isinstance(module, BATCHNORM):
            module.requires_grad_(True)  # weight (scale) and bias (shift) of every BN layer
    return model, torch.optim.Adam(param_groups(model, spec, recipe.lrs))
