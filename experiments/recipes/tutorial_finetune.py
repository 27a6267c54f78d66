"""ResNet18 fine-tuned the way the PyTorch tutorial does it: SGD, momentum, a tenfold cut every 7 epochs.

Source: the PyTorch tutorial "Transfer Learning for Computer Vision" (Sasank Chilamkurthy,
pytorch.org/tutorials/beginner/transfer_learning_tutorial.html), section "Finetuning the
ConvNet"::

    model_ft = models.resnet18(weights='IMAGENET1K_V1')
    model_ft.fc = nn.Linear(num_ftrs, 2)
    optimizer_ft = optim.SGD(model_ft.parameters(), lr=0.001, momentum=0.9)
    exp_lr_scheduler = lr_scheduler.StepLR(optimizer_ft, step_size=7, gamma=0.1)
    train_model(model_ft, criterion, optimizer_ft, exp_lr_scheduler, num_epochs=25)

with `batch_size=4`, `RandomResizedCrop(224)` (torchvision's default crop of 8-100% of the
image: `augment="tutorial"`) and a horizontal flip for training, Resize(256) +
CenterCrop(224) for val, ImageNet normalisation.

BatchNorm: the tutorial's loop calls `model.train()` on the whole network, so every
BatchNorm layer normalises with the statistics of a batch of *4* images and moves its
running mean/var towards them. Everything trains here, so that is what happens here too
(BN in train mode; experiments/bn_policy.py measures how much that matters).

Epochs: the tutorial trains in all 25 of its epochs and calls `scheduler.step()` after each
training phase. Here that is `train_epochs=25` after our epoch-0 baseline, with the StepLR
stepped after each training epoch: epochs 1-7 at 1e-3, 8-14 at 1e-4, 15-21 at 1e-5,
22-25 at 1e-6. The tutorial returns the epoch with the best val accuracy and prints that
accuracy, a number chosen on the images it is scored on; the run folder keeps that epoch
(best.pth), but the headline here is scored without selection (tl.engine.headline.score_headline).
"""

import torch

from tl.models import param_groups, set_trainable
from tl.recipe import Recipe

RECIPE = Recipe(
    name="tutorial_finetune",
    source="PyTorch tutorial",  # see the docstring for the exact source
    strategy="ImageNet init, new head, everything trains; SGD 1e-3 m 0.9, StepLR(7, 0.1); BN in train mode",
    lrs={"all": 1e-3},
    train_epochs=25,
    batch_size=4,
    augment="tutorial",  # RandomResizedCrop(224): torchvision's default scale (0.08, 1.0)
)


def build(model, spec, recipe):
    set_trainable(model, spec, ["body", "neck", "head"])
    optimizer = torch.optim.SGD(param_groups(model, spec, recipe.lrs), momentum=0.9)
    # an epoch schedule: the loop steps it after every training epoch, as the tutorial does
    return model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
