"""Two stages, fastai's `fine_tune`: one epoch for the head on the frozen body, then everything, each one-cycle.

Source: fastai, `Learner.fine_tune` (fastai/callback/schedule.py; docs.fast.ai/callback.schedule)::

    def fine_tune(self, epochs, base_lr=2e-3, freeze_epochs=1, lr_mult=100,
                  pct_start=0.3, div=5.0, **kwargs):
        self.freeze()
        self.fit_one_cycle(freeze_epochs, slice(base_lr), pct_start=0.99, **kwargs)
        base_lr /= 2
        self.unfreeze()
        self.fit_one_cycle(epochs, slice(base_lr/lr_mult, base_lr), pct_start=pct_start, div=div, **kwargs)

with fastai's defaults around it: Adam with decoupled weight decay 0.01, betas (0.9, 0.99),
eps 1e-5 (here `torch.optim.AdamW`), batch size 64, and fastai's three parameter groups
(two halves of the body, then the head; here body / neck / head).

Stage 1, "frozen body" (1 epoch): `freeze()` trains the last group only, but fastai's
`train_bn=True` keeps every BatchNorm layer's scale and shift trainable and in train mode
(its statistics move too). `slice(base_lr)` gives the last group base_lr and the others
base_lr / 10: head 2e-3, the BatchNorm parameters of body and neck 2e-4. One-cycle with
`pct_start=0.99`: the rate climbs for the whole epoch (warmup) and drops at the very end.

Stage 2, "everything" (the rest of the epochs): the rates are halved (base_lr 1e-3) and
spread geometrically from base_lr / lr_mult to base_lr across the groups: body 1e-5, neck
1e-4, head 1e-3. One-cycle with `pct_start=0.3, div=5`: from a fifth of each peak up to
it in 30% of the steps, then down to peak / 1e5. A fresh optimizer (fastai's `fine_tune` keeps
its one optimizer, and the head's Adam state, across both `fit_one_cycle` calls).

Where this differs from fastai: `torch.optim.lr_scheduler.OneCycleLR` places its peak one
step apart from fastai's and names the final rate differently (see tl.stages.one_cycle);
fastai applies no weight decay to BatchNorm and bias parameters (`wd_bn_bias=False`),
here every trained parameter decays. `fine_tune` has no default epoch count: we give the
second stage 9, so the run trains 10 epochs like document 003's recipes (`--epochs N`
keeps the 1 frozen epoch and gives stage 2 the other N - 1). Neither stage's features can
be cached: BatchNorm trains in both.
"""

import torch

from tl.models import param_groups, set_trainable, unfreeze_batchnorm
from tl.recipe import Recipe
from tl.stages import Stage, one_cycle

RECIPE = Recipe(
    name="two_stage",
    source="fastai fine_tune",
    strategy="1 epoch: head + BatchNorm on the frozen body; then everything at body/neck/head rates 1e-5/1e-4/1e-3; "
             "AdamW, one-cycle in each stage",
    backbone="resnet18",  # fastai's vision_learner default in its tutorials (resnet34 in the book): 003's ResNet18
    first_epochs=1,  # freeze_epochs=1
    first_lrs={"body": 2e-4, "neck": 2e-4, "head": 2e-3},  # slice(base_lr): base_lr/10 for all but the last group
    lrs={"body": 1e-5, "neck": 1e-4, "head": 1e-3},  # slice(base_lr/2/lr_mult, base_lr/2), geometric over 3 groups
    train_epochs=10,  # 1 frozen + fine_tune(9)
    batch_size=64,  # fastai's DataLoaders default bs=64
)


def adam(model, spec, lrs):
    """fastai's default optimizer: Adam, decoupled weight decay 0.01, betas (0.9, 0.99), eps 1e-5."""
    return torch.optim.AdamW(param_groups(model, spec, lrs), betas=(0.9, 0.99), eps=1e-5, weight_decay=0.01)


def freeze_with_bn(model, spec, recipe):
    set_trainable(model, spec, ["head"])  # freeze(): only the last group ...
    unfreeze_batchnorm(model)  # ... and, train_bn=True, every BatchNorm layer's scale and shift (none: the head alone)
    return adam(model, spec, recipe.first_lrs)


def unfreeze(model, spec, recipe):
    set_trainable(model, spec, ["body", "neck", "head"])
    return adam(model, spec, recipe.lrs)


def build(model, spec, recipe):
    return model, [
        Stage("frozen body", freeze_with_bn, epochs=recipe.first_epochs, interval="step",
              schedule=lambda opt, epochs, steps: one_cycle(opt, epochs * steps, pct_start=0.99, div=25.0)),
        Stage("everything", unfreeze, interval="step",
              schedule=lambda opt, epochs, steps: one_cycle(opt, epochs * steps, pct_start=0.3, div=5.0)),
    ]
