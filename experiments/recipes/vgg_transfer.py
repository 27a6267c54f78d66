"""VGG16 transfer learning: train only `classifier.6`, the new 4096 -> 2 output layer.

Document 002 §1.3: `net.classifier[6] = nn.Linear(4096, 2)`, then
`update_param_names = ["classifier.6.weight", "classifier.6.bias"]` are the only
parameters with `requires_grad=True`, optimised by SGD lr 1e-3, momentum 0.9, batch 32,
`num_epochs=2` in 002's loop = one validation-only epoch + one training epoch, so
`train_epochs=1`. The document reports val accuracy 0.4967 at epoch 0 (random head) and
0.9608 after one epoch: ImageNet features already separate ants from bees linearly.

The net stays in train mode while training, so the Dropout layers before the head
(classifier.2 and .5) still drop activations: they regularise the new layer. VGG16 has
no BatchNorm, so nothing else changes between the modes.
"""

import torch

from tl.models import param_groups, set_trainable
from tl.recipe import Recipe

RECIPE = Recipe(
    name="vgg_transfer",
    source="002 §1.3",
    strategy="ImageNet init, only classifier.6 (the new head) trains",
    backbone="vgg16",
    lrs={"head": 1e-3},
    train_epochs=1,  # 002: num_epochs=2, epoch 0 validates only
    batch_size=32,
    frozen_bn_eval=True,  # no effect on VGG16; keeps the strategy exact on BN backbones
)


def build(model, spec, recipe):
    set_trainable(model, spec, ["head"])  # vgg16's head is classifier.6
    return model, torch.optim.SGD(param_groups(model, spec, recipe.lrs), momentum=0.9)
