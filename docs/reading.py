# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Reading the core: one frozen run, cell by cell
#
# The sections follow the map in docs/READING.md, the core's files (`tl/*.py`) in the order a run
# meets them. Each cell calls the core's own functions, so what you see is what `python main.py -e
# resnet_frozen -b efficientnet_lite0 --data ../shared/data/hymenoptera_data` does, one step at a
# time, without the machinery around it; where a cell uses a piece of that machinery, the text says
# which file holds it. `docs/reading.ipynb` is this file's cells (`docs/reading.py`, jupytext's percent
# format) with the outputs of `python -m benchmarks.reading_notebook` on the shared ants-vs-bees
# photos; docs/READING.md says how long that takes on a CPU.
#
# The source documents are cited by number: 001 (a book chapter: ResNet18 as a frozen feature
# extractor), 002 (VGG16 on ants and bees: §1.3 transfer learning, §1.4 fine-tuning), 003
# (torchvision's ResNet18 from random weights, §3, and from ImageNet's, §4).

# %%
import os
import sys
import warnings
from pathlib import Path

# the notebook runs in docs/; the project's packages are in the folder above it
ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "tl" / "__init__.py").is_file())
sys.path.insert(0, str(ROOT))

# which photos and which network: the shared photos and EfficientNet-Lite0 (its ImageNet weights ship
# in a pip package, so this runs offline). The project's tests point these at tiny synthetic images.
DATA = ROOT / os.environ.get("TL_READING_DATA", "../shared/data/hymenoptera_data")  # relative: to the project
BACKBONE = os.environ.get("TL_READING_BACKBONE", "efficientnet_lite0")  # a name of tl.models.BACKBONES
WEIGHTS = os.environ.get("TL_READING_WEIGHTS", "imagenet")  # or "none", or a state_dict file
print(f"photos:   {DATA.resolve()}\nbackbone: {BACKBONE} with {WEIGHTS} weights")
warnings.filterwarnings("ignore", message="IProgress not found")  # timm's import asks tqdm for Jupyter widgets

import matplotlib.pyplot as plt
import pandas as pd
import torch

from tl.engine.progress import show_progress
from tl.loop import seed_everything

seed_everything(0)  # Python, NumPy and torch: the same numbers on every run of this notebook
show_progress(False)  # tl/engine/progress.py: no bars (in a notebook each update would stay)
plt.rcParams.update({"figure.dpi": 72, "figure.figsize": (9, 3)})  # small pictures: the .ipynb stays small
pd.set_option("display.precision", 4)

# %% [markdown]
# ## 1. The recipe: the document's numbers and what trains
#
# A `Recipe` (`tl/recipe.py`) holds the numbers of one variant of a source document, and its
# recipe file, experiments/recipes/NAME.py (`get_experiment` of experiments/__init__.py loads it by
# name), a `build(model, spec, recipe)` that says what trains. `resnet_frozen` is document 001's
# frozen feature extractor (listings 5-16 to 5-22): every pretrained parameter frozen, a new last
# layer, Adam at its default rate, batch 32, 13 training epochs. `--backbone` swaps the
# architecture and keeps the strategy, as we do here. Below it, `resnet_finetune` (003 §4) for
# comparison: the same two lines, but every group trains (body, neck and head, at 1e-4).

# %%
import inspect

from experiments import get_experiment

frozen = get_experiment("resnet_frozen")
recipe = frozen.RECIPE
print(f"{recipe.name} ({recipe.source}): {recipe.strategy}")
print(f"rates {recipe.lrs}, batch {recipe.batch_size}, {recipe.train_epochs} training epochs, "
      f"frozen BatchNorm in eval mode: {recipe.frozen_bn_eval}\n")
print(inspect.getsource(frozen.build))
finetune = get_experiment("resnet_finetune")
print(f"{finetune.RECIPE.name} ({finetune.RECIPE.source}): {finetune.RECIPE.strategy}\n")
print(inspect.getsource(finetune.build))

# %% [markdown]
# ## 2. The model: pretrained weights, a new head, three groups
#
# `tl.models.get_backbone` gives a network's `Backbone`: where its head is, its groups, its crop
# size and pixel scale. `build_model` (tl/engine/weights.py) finds the ImageNet weights (offline
# first) and hands them to `tl.models.create_model`, which builds the architecture, loads them, and
# swaps the last Linear layer for a new one with one output per class (002 §1.3 step 4:
# `net.classifier[6] = nn.Linear(in_features=4096, out_features=2)`; 003 §4: `model.fc =
# nn.Linear(num_ftrs, 2)`). The classes are the folder names of `train/`, as `class_folders`
# (tl/engine/images.py, the one rule every command uses) reads them.

# %%
from tl.engine.images import class_folders
from tl.engine.weights import build_model
from tl.models import get_backbone

classes, _ = class_folders(DATA / "train")
spec = get_backbone(BACKBONE)
model = build_model(BACKBONE, num_classes=len(classes), weights=WEIGHTS)
print(f"classes: {classes}")
print(f"the new head, {spec.head}: {model.get_submodule(spec.head)}")
print(f"{sum(p.numel() for p in model.parameters()):,} parameters; ImageNet's crop size: {spec.image_size} pixels")

# %% [markdown]
# Every backbone names three groups of parameters, after 002 §1.4's split of VGG16 (`features`,
# `classifier.0`/`classifier.3`, `classifier.6`): the **body** (generic edges, textures, parts),
# the **neck** (the layers between the body and the output, the most ImageNet-specific; "neck" is
# this project's word) and the **head** (the new last layer). `param_groups` turns them into
# optimizer groups, each with its own learning rate: 002 §1.4's fine-tuning rates here.

# %%
from tl.models import group_of, param_groups

rates = {"body": 1e-4, "neck": 5e-4, "head": 1e-3}  # 002 §1.4
names = {g: [n for n, _ in model.named_parameters() if group_of(n, spec) == g] for g in rates}
pd.DataFrame([{"group": g["name"], "lr": g["lr"], "tensors": len(g["params"]),
               "parameters": sum(p.numel() for p in g["params"]),
               "first": names[g["name"]][0], "last": names[g["name"]][-1]}
              for g in param_groups(model, spec, rates)])

# %% [markdown]
# ### Freezing: only the head trains
#
# `set_trainable(model, spec, ["head"])` sets `requires_grad=False` on every parameter outside the
# head (002 §1.3 step 7 does it by name, `classifier.6.weight` and `.bias`). A frozen parameter
# gets no gradient, so the optimizer never moves it. BatchNorm's running mean and variance are
# buffers, not parameters: freezing does not stop them, a forward pass in train mode updates them.
# The recipe's `frozen_bn_eval=True` keeps those layers in eval mode while the rest trains
# (`tl.models.eval_batchnorm`, used by the loop; docs/ERRATA.md on 001 and 003).

# %%
from tl.models import eval_batchnorm, parameter_table, set_trainable

set_trainable(model, spec, ["head"])
print(f"{len(eval_batchnorm(model, frozen_bn_eval=True, bn_eval=False))} frozen BatchNorm layers "
      f"will stay in eval mode")
pd.DataFrame(parameter_table(model)).tail(4)  # the last modules and the total

# %% [markdown]
# The recipe's `build` is those two lines: freeze, then an optimizer over the head's parameters
# alone (`param_groups` hands the optimizer trainable parameters only).

# %%
from tl.recipe import make_criterion

model, optimizer = frozen.build(model, spec, recipe)
criterion = make_criterion(recipe)  # cross entropy, as every document uses for classes
print(optimizer, criterion, sep="\n")

# %% [markdown]
# ## 3. The data: transforms, data sets, the phase dict of loaders
#
# `tl.data.build_transforms` gives two pipelines (002 §1.3 step 2, `ImageTransform`): train crops
# a random 50-100% of each photo and flips a coin for a mirror image, a new draw every epoch; val
# resizes the shorter side and cuts the centre, the same every time. Both scale the pixels as the
# backbone's weights were trained. `select_images` (tl/engine/selection.py; every command goes
# through it) decides which files are each phase's images, and `tl.data.make_loaders` gives the loop
# its dict `{"train": ..., "val": ...}` (step 3), only train shuffled, from a seeded generator.

# %%
from tl.data import build_transforms, make_loaders
from tl.engine.selection import ImageChoice, select_images

transforms = build_transforms(spec.mean, spec.std, size=spec.image_size, policy=recipe.augment)
sets = select_images(ImageChoice(data=DATA), transforms, phases=("train", "val"))
loaders = make_loaders(sets, batch_size=recipe.batch_size, seed=0)
print({phase: f"{len(ds)} images, {len(loaders[phase])} batches" for phase, ds in sets.items()})
print(transforms["train"])

# %% [markdown]
# One batch, as 002 §1.3 step 3 prints it: a (batch, channels, height, width) tensor and its
# labels. To look at the pictures (001 5-14 shows them), undo the normalisation.

# %%
inputs, labels = next(iter(loaders["train"]))
print(inputs.shape, inputs.dtype, f"values {inputs.min():.2f}..{inputs.max():.2f}")
print(labels)

mean, std = torch.tensor(spec.mean).view(3, 1, 1), torch.tensor(spec.std).view(3, 1, 1)
fig, axes = plt.subplots(2, 8, figsize=(9, 2.8))
for ax, image, label in zip(axes.flat, inputs, labels):
    ax.imshow((image * std + mean).clamp(0, 1).permute(1, 2, 0))  # CHW, normalised -> HWC in [0, 1]
    ax.set_title(classes[label], fontsize=9)
    ax.axis("off")
fig.suptitle("train: random crops and flips, a new draw every epoch")
plt.show()

# %% [markdown]
# ## 4. The loop: epoch 0 is the untrained baseline
#
# `tl.loop.train_model` is 002 §1.3 step 8's loop written out: for each epoch, for each phase,
# `net.train()` or `net.eval()`, then for each batch a forward pass under
# `torch.set_grad_enabled(phase == "train")`, the loss, and in train `loss.backward()` and
# `optimizer.step()`. **Epoch 0 only validates**, so the first row is the network before any
# update: pretrained features and a random head, about chance. `num_epochs` counts that epoch,
# as 002's does. Everything optional comes in through one `Hooks` object; here only the
# recipe's frozen BatchNorm (and no progress bars).
#
# The recipe trains 13 epochs; here 2, which take most of this notebook's time on a CPU. The
# seconds and images per second are those of the machine that made the outputs (for the committed
# ones, a 2-core CPU shared with other work).

# %%
from tl.loop import Hooks, train_model

buffers_before = {name: b.clone() for name, b in model.named_buffers()}
history = train_model(model, loaders, criterion, optimizer, num_epochs=3,
                      hooks=Hooks(frozen_bn_eval=recipe.frozen_bn_eval, progress=False))
changed = [name for name, b in model.named_buffers() if not torch.equal(b, buffers_before[name])]
print(f"best val epoch: {history.best_epoch} (accuracy {history.best_acc:.4f}); "
      f"BatchNorm buffers changed by training: {len(changed)} of {len(buffers_before)}")

# %%
pd.DataFrame(history.rows)

# %% [markdown]
# ## 5. Frozen features: compute the frozen part once
#
# With only the head training, every epoch pushes the same val photos through the same frozen
# network. `tl.features.split_at_cut` splits the model where training starts: a frozen prefix and
# the tail that trains (sharing its parameters with the model). Storing the prefix's output is
# exact only if the prefix computes in the loop's train mode what it computes in eval mode.
# `check_prefix_is_fixed` does not assume that from module types: it *tries* it on a few val
# images and returns None, or the reason it is not so.

# %%
from tl.features import check_prefix_is_fixed, split_at_cut

split = split_at_cut(model, spec)
probe = torch.stack([sets["val"][i][0] for i in range(4)])  # 4 val images, as a run checks
print(f"cut at {split.cut}: the tail {split.tail}, {split.feature_dim} numbers per image")
print("frozen BatchNorm in eval mode (the recipe):", check_prefix_is_fixed(model, split, True, probe))
print("BatchNorm in train mode (001's loop):      ", check_prefix_is_fixed(model, split, False, probe))

# %% [markdown]
# So the features can be stored. `compute_features` (tl/engine/feature_store.py) runs the prefix
# once over a data set, in eval mode, up to the cut (`tl.features.forward_to` stops the forward pass
# there). Val's transform is deterministic, so its features are exact; train's are exact only
# without augmentation, so here both phases use the val pipeline (a run does that with
# `--no-augment`). The tail alone, on stored features, gives the whole model's logits.

# %%
from tl.engine.feature_store import FeaturePass, compute_features
from tl.features import FeatureSet

plain_transforms = build_transforms(spec.mean, spec.std, size=spec.image_size, augment=False)
plain = select_images(ImageChoice(data=DATA), plain_transforms, phases=("train", "val"),
                      log=lambda line: None)  # the same files as in section 3, which said what it left out
stored = {phase: FeatureSet(compute_features(model, split.cut, ds, FeaturePass()), torch.tensor(ds.targets))
          for phase, ds in plain.items()}
print({phase: tuple(s.features.shape) for phase, s in stored.items()}, "(views, images, numbers)")
model.eval()
with torch.no_grad():
    same = torch.allclose(split.tail(stored["val"].features[0, :4]), model(probe), rtol=1e-4, atol=1e-5)
print("the tail on stored features gives the model's logits:", same)

# %% [markdown]
# The loop does not change: `FeaturesOrImages` sends a feature vector through the tail alone,
# and the loaders hold features instead of images. The head goes on training where section 4
# left it; compare the images per second with section 4's rows.

# %%
from tl.features import FeaturesOrImages

on_features = make_loaders(stored, batch_size=recipe.batch_size, seed=0)
net = FeaturesOrImages(model, split.tail)
more = train_model(net, on_features, criterion, optimizer, num_epochs=6,
                   hooks=Hooks(frozen_bn_eval=recipe.frozen_bn_eval, progress=False))
pd.DataFrame(more.rows)[["epoch", "phase", "loss", "acc", "images_per_s"]]

# %% [markdown]
# ## 6. Stages and schedules
#
# A recipe's `build` may return stages instead of one optimizer (`tl/stages.py`). `two_stage`
# (experiments/recipes/two_stage.py) is fastai's `fine_tune`: one epoch with the body frozen (the
# head and BatchNorm train), then everything at body/neck/head rates, each stage with a one-cycle
# schedule stepped after every batch. `place` lays the stages on the loop's epochs; a run then
# calls `train_model` once per stage with the same History (`train_stages` in tl/engine/run.py,
# where `stage_hooks` of tl/engine/stage_setup.py turns a stage's settings into the loop's `Hooks`),
# so the epochs count on and the best epoch is chosen over the run. Below: the plan of the recipe's
# 10 epochs, and each group's learning rate at every step (the schedules alone, without training).

# %%
import math

from tl.stages import as_stages, place

two = get_experiment("two_stage")
_, stages = as_stages(two.build(model, spec, two.RECIPE))
steps_per_epoch = math.ceil(len(sets["train"]) / two.RECIPE.batch_size)
spans = place(stages, two.RECIPE.train_epochs)
schedule = []
for span in spans:
    optimizer = span.stage.setup(model, spec, two.RECIPE)  # sets what trains, a fresh optimizer
    scheduler = span.stage.schedule(optimizer, span.epochs, steps_per_epoch)
    trains = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"stage {span.index + 1} {span.stage.name!r}: loop epochs {span.start}..{span.end - 1}, "
          f"{span.epochs} training, {trains:,} parameters train")
    for _ in range(span.epochs * steps_per_epoch):
        schedule.append({g["name"]: g["lr"] for g in optimizer.param_groups})
        optimizer.step()  # no gradients: nothing moves; torch wants a step before the schedule's
        scheduler.step()

pd.DataFrame(schedule).plot(logy=True, xlabel=f"optimizer step ({steps_per_epoch} a training epoch)",
                            ylabel="learning rate", title="two_stage: one-cycle in each stage")
plt.show()

# %% [markdown]
# ## Where to go next
#
# docs/READING.md's map goes on: `tl/distributed.py` (the loop's three `[DDP]` lines), then
# `tl/engine/run.py`, the same run as the machinery does it. docs/GUIDE.md has every recipe and option.
