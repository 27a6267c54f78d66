"""tl: the study library of the transfer-learning reference.

This package knows nothing about any one experiment (karpathy/minGPT's rule for
`mingpt/` vs `projects/`): the recipes in `experiments/` decide *what* trains,
`tl/` supplies the pieces they share. Read it in this order:

    data.py        images -> tensors, the phase-dict of DataLoaders
    models.py      backbones, pretrained weights, new heads, freezing, parameter groups
    loop.py        THE train/validate loop (the only code that trains a model)
    recipe.py      one experiment = data + model + loop + checkpoints + results
    checkpoint.py  saving and resuming
    evaluate.py    scoring saved models, predicting single images
    features.py    caching what a frozen backbone computes
    plots.py       learning curves and pictures
"""


class TLError(Exception):
    """A problem with the user's input (data, weights, checkpoint, option).

    The command line prints the message alone, without a traceback, and exits with
    status 2: the message is meant to say what is wrong and how to fix it.
    """


class Interrupted(TLError):
    """Ctrl-C: the run stopped where its last checkpoint left it, and says how to go on.
    A comparison of many runs stops as a whole rather than recording it as a failed run."""
