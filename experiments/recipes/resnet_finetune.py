"""ResNet18 fine-tuned: start from ImageNet weights, replace `fc`, let everything train.

Document 003 §4 ("Transfer Learning 사용"): `models.resnet18(pretrained=True)`,
`model.fc = nn.Linear(num_ftrs, 2)`, Adam lr 1e-4 on *all* parameters, batch 8,
10 training epochs (plus our epoch-0 baseline). The document reports 93.7% against
the scratch run's 66%: same network, same data, same epochs; the only difference is
where the weights start. The small learning rate matters: the pretrained features are
already good, and a large step would wreck them before the new head has learned.
"""

import torch

from tl.models import param_groups, set_trainable
from tl.recipe import Recipe

RECIPE = Recipe(
    name="resnet_finetune",
    source="003 §4",
    strategy="ImageNet init, new head, every layer trains",
    lrs={"all": 1e-4},
    train_epochs=10,
    batch_size=8,
)


def build(model, spec, recipe):
    set_trainable(model, spec, ["body", "neck", "head"])
    return model, torch.optim.Adam(param_groups(model, spec, recipe.lrs))
