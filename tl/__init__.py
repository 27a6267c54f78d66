"""tl: the study library of the transfer-learning reference.

This package knows nothing about any one experiment (karpathy/minGPT's rule for
`mingpt/` vs `projects/`): the recipes in `experiments/recipes/` decide *what* trains, `tl/`
supplies the pieces they share. Its top level is the core, what a learner reads in one
sitting; follow one frozen run through it, as docs/READING.md does (it runs offline here):

    python main.py -e resnet_frozen -b efficientnet_lite0 --quick \\
        --data ../shared/data/hymenoptera_data

    recipe.py       the numbers of one variant of the source documents (a Recipe)
    models.py       a backbone, its pretrained weights, a new head, what trains (body/neck/head)
    data.py         transforms and the phase dict of DataLoaders the loop walks
    loop.py         THE train/validate loop: epoch 0 is the untrained baseline
    features.py     the frozen-feature idea: a frozen prefix computed once, checked on a few images
    stages.py       recipes in stages, and learning-rate schedules
    distributed.py  the few lines several processes (torchrun) change, marked [DDP]

When you need the machinery (a run's folder and records, resume, the caches, image
hygiene, weights offline, evaluation, export, pictures), open `tl/engine/`: `run.py`
holds the run as named steps, and `tl/engine/__init__.py` says each file's job in a line.
"""


class TLError(Exception):
    """A problem with the user's input (data, weights, checkpoint, option).

    The command line prints the message alone, without a traceback, and exits with
    status 2: the message is meant to say what is wrong and how to fix it.
    """


class Interrupted(TLError):
    """Ctrl-C: the run stopped where its last checkpoint left it, and says how to go on.
    The command line exits with 130, the shell's status for Ctrl-C, not 2. A comparison
    of many runs stops as a whole rather than recording it as a failed run."""
