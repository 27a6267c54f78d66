"""What the studies of experiments/ and the scripts of benchmarks/ share: naming a data set,
training one recipe where a failure is a row of the table, recording where a number came from
(commit, machine), and the paired bootstrap that says whether two recipes differ.

Importing it loads no torch or numpy (each function imports what it needs), so a study's
or a benchmark's `--help` stays fast.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


# ----------------------------------------------------------------------------- data sets and runs
def dataset_name(data_dir: Path) -> str:
    """What the tables call a data set: its folder's name (hymenoptera_data, dogs-vs-cats)."""
    return Path(data_dir).resolve().name


def train_or_reason(module, opts, log) -> tuple[object, dict]:
    """(the run's result, {}) or (None, {"status", "reason"}) when it could not run or failed
    (`result_or_reason`)."""
    from tl.engine.run import run

    return result_or_reason(lambda: run(module.RECIPE, module.build, opts, log=lambda line: log("    " + line)))


def result_or_reason(call) -> tuple[object, dict]:
    """(call(), {}) or (None, {"status", "reason"}) when it could not run or failed: in a study of
    many runs, one recipe's problem is a row of the table, not the end of the study. Ctrl-C,
    SIGTERM and the machine's problems (an OSError: a full disk, a folder that cannot be
    written, a lock taken away) stop the whole study: every later run would meet them too, and a
    row would record the machine's failure as the recipe's. Every study that records a recipe's
    problem as a row goes through it (bn_policy records none: any problem stops it)."""
    from tl import Interrupted, TLError
    from tl.engine.folder_lock import LockLost

    try:
        return call(), {}
    except (Interrupted, OSError, LockLost):
        raise
    except TLError as exc:
        return None, {"status": "not run", "reason": str(exc).splitlines()[0]}
    except Exception as exc:  # a bug in one recipe must not hide the other results
        return None, {"status": "failed", "reason": f"{type(exc).__name__}: {exc}".splitlines()[0]}


# ----------------------------------------------------------------------------- where a number came from
def unchanged(out: Path, runs_dir: Path) -> str:
    """What a study stopped before it wrote its tables says: `out` is unchanged, and where the
    runs it finished are, if any."""
    done = runs_dir.is_dir() and any(runs_dir.iterdir())
    return f"{out} is unchanged" + (f" (the runs so far are in {runs_dir})" if done else " (no run finished)")


def machine_description() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{os.cpu_count()} CPU cores ({cpu}){gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        # changed code, not changed results: the tables this command rewrites do not count
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!results"],
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ----------------------------------------------------------------------------- the paired bootstrap
DRAWS = 4000  # bootstrap draws: enough for stable 2.5% / 97.5% percentiles


def paired_bootstrap(a: np.ndarray, b: np.ndarray, draws: int = DRAWS, seed: int = 0) -> tuple[float, float, float]:
    """Accuracy of recipe A minus recipe B, and a 95% interval for it: (difference, low, high).

    `a` and `b` are (seeds, images) arrays of 1 (correct) and 0: row k of both comes from the
    same seed, column j from the same image. One bootstrap draw picks seeds and images with
    replacement, *the same ones for A and B* (paired: an image that is hard for both cancels
    out), and recomputes the difference; the middle 95% of the draws is the interval. It
    answers "with other seeds and another sample of such images, how far could the difference
    move?" With one seed, only the images are resampled.

    Drawing with replacement gives each seed and each image a count (how often it was drawn),
    so a draw's mean difference is a weighted sum: counts_seeds @ d @ counts_images / (S * N).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)  # (S, N): +1 only A right, -1 only B right
    n_seeds, n_images = d.shape
    seed_counts = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=draws)  # (draws, S)
    image_counts = rng.multinomial(n_images, np.full(n_images, 1 / n_images), size=draws)  # (draws, N)
    diffs = ((seed_counts @ d) * image_counts).sum(axis=1) / (n_seeds * n_images)  # (draws,)
    low, high = np.percentile(diffs, [2.5, 97.5])
    return float(d.mean()), float(low), float(high)
