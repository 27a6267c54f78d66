"""ResNet18 as a fixed feature extractor, the PyTorch tutorial's way: BatchNorm statistics still drift.

Source: the PyTorch tutorial "Transfer Learning for Computer Vision" (Sasank Chilamkurthy,
pytorch.org/tutorials/beginner/transfer_learning_tutorial.html), section "ConvNet as fixed
feature extractor"::

    model_conv = torchvision.models.resnet18(weights='IMAGENET1K_V1')
    for param in model_conv.parameters():
        param.requires_grad = False
    model_conv.fc = nn.Linear(num_ftrs, 2)          # new, so it trains
    optimizer_conv = optim.SGD(model_conv.fc.parameters(), lr=0.001, momentum=0.9)
    exp_lr_scheduler = lr_scheduler.StepLR(optimizer_conv, step_size=7, gamma=0.1)
    train_model(model_conv, criterion, optimizer_conv, exp_lr_scheduler, num_epochs=25)

with the same data pipeline and batch size 4 as `tutorial_finetune`.

BatchNorm, the point of this recipe: the tutorial's loop still calls `model.train()`, and
`requires_grad = False` stops gradients, not buffer updates. So the "fixed" extractor is
not fixed: every training batch of 4 images moves each BN layer's running mean and
variance, and each forward pass normalises with the batch's own statistics. This recipe
keeps that behaviour (`frozen_bn_eval=False`), which also means its features cannot be
cached (the cache's probe sees the prefix change: tl/features.py). `resnet_frozen` is the
same idea with the drift switched off; experiments/bn_policy.py compares the two.

Epochs and scheduler as in `tutorial_finetune`: 25 training epochs after the baseline,
StepLR(7, 0.1) stepped after each.
"""

import torch

from tl.models import param_groups, set_trainable
from tl.recipe import Recipe

RECIPE = Recipe(
    name="tutorial_frozen",
    source="PyTorch tutorial",  # see the docstring for the exact source
    strategy="ImageNet init, frozen body with BN in train mode (statistics drift), only the head trains; "
             "SGD 1e-3 m 0.9, StepLR(7, 0.1)",
    lrs={"head": 1e-3},
    train_epochs=25,
    batch_size=4,
    frozen_bn_eval=False,  # the tutorial's model.train(): frozen BN layers keep updating their statistics
    augment="tutorial",
)


def build(model, spec, recipe):
    set_trainable(model, spec, ["head"])
    optimizer = torch.optim.SGD(param_groups(model, spec, recipe.lrs), momentum=0.9)  # the head's parameters only
    return model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
