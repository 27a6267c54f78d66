"""Helpers that several test files share (fixtures are in conftest.py): the tiny runs the tests
train through main.main or the API, command-line calls that check for a traceback, test images
and networks, and the comparison of two runs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

import main
from experiments import get_experiment
from tests.conftest import TinyNet
from tl.engine import checkpoint, files
from tl.engine.options import RunOptions
from tl.engine.run import run
from tl.models import get_backbone


# ----------------------------------------------------------------------------- the command line
def interruptible() -> None:
    """`preexec_fn` of a child process that a test interrupts with SIGINT, as Ctrl-C would. A shell
    starts a background job (as CI and `nohup ... &` run the suite) with SIGINT ignored, a child
    inherits that, and Python installs its KeyboardInterrupt handler only where SIGINT is not
    ignored: without this the child would never see the signal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(capsys, *argv) -> tuple[int, str, str]:
    """main.main(argv) -> (exit status, stdout, stderr); never a traceback."""
    code = main.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def cli_exit(capsys, *argv) -> tuple[int, str, str]:
    """main.main(argv) -> (exit status, stdout, stderr); argparse's exits count too. No traceback, ever."""
    try:
        code = main.main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


# ----------------------------------------------------------------------------- a tiny run through main.main
def train_one_epoch(capsys, data_dir, out, *extra, experiment="resnet_scratch"):
    """A one-epoch run of the tiny backbone; returns (exit status, stdout, stderr)."""
    return cli_exit(capsys, "-e", experiment, "-b", "tiny", "--data", data_dir, "--epochs", "1", "--out", out,
                    "--no-progress", "--workers", "0", *extra)


def train_quick(data, out, *extra, experiment="resnet_scratch") -> Path:
    """A one-epoch --quick run of the tiny backbone; its run folder."""
    assert main.main(["-e", experiment, "-b", "tiny", "--data", str(data), "--quick", "--out", str(out),
                      "--no-progress", *map(str, extra)]) == 0
    (run_dir,) = Path(out).iterdir()
    return run_dir


def train_three_epochs(data: Path, out: Path, backbone: str = "tiny", experiment: str = "resnet_scratch",
                       *extra: str) -> Path:
    """A --quick run of 3 epochs through main.main; its run folder."""
    assert main.main(["-e", experiment, "-b", backbone, "--data", str(data), "--quick", "--epochs", "3",
                      "--out", str(out), "--no-progress", *extra]) == 0
    (run_dir,) = out.iterdir()
    return run_dir


def train_scratch(data, out, epochs, *extra):
    """resnet_scratch on the tiny backbone through main.main; its run folder."""
    argv = ["-e", "resnet_scratch", "-b", "tiny", "--data", str(data), "--out", str(out), "--epochs", str(epochs),
            "--lr-scale", "50", "--batch-size", "5", "--no-progress", *extra]
    assert main.main(argv) == 0
    (run_dir,) = out.iterdir()
    return run_dir


def train_frozen(data, out, epochs, *extra, weights=None, code=0):
    """resnet_frozen on the tiny backbone through main.main (exit status `code`); its run folder."""
    argv = ["-e", "resnet_frozen", "-b", "tiny", "--data", str(data), "--out", str(out), "--epochs", str(epochs),
            "--lr-scale", "20", "--batch-size", "5", "--no-progress", *extra]
    if weights is not None:
        argv += ["--weights", str(weights)]
    assert main.main(argv) == code
    (run_dir,) = out.iterdir()
    return run_dir


# ----------------------------------------------------------------------------- the API, the loop alone
def finetune_one_epoch(data, out, **options):
    """One epoch of resnet_finetune on the tiny backbone through the API (no pictures); its RunResult."""
    module = get_experiment("resnet_finetune")
    opts = RunOptions(data=data, backbone="tiny", weights="none", epochs=1, batch_size=5, out=out,
                      progress=False, plots=False, **options)
    return run(module.RECIPE, module.build, opts, log=lambda s: None)


def train_with_ema(data, out, recipe, epochs, weights, **options):
    """A --quick run of `recipe` on the tiny backbone through the API (no pictures: seconds)."""
    module = get_experiment(recipe)
    opts = RunOptions(data=data, backbone="tiny", weights=str(weights), epochs=epochs, out=out, batch_size=5,
                      lr_scale=20, progress=False, plots=False, augment=False, ema=0.7, run_name="r", **options)
    opts.make_quick()
    return run(module.RECIPE, module.build, opts, log=lambda s: None).run_dir


def loop_setup(data, seed=0):
    """(a fresh tiny model, its seeded loaders) on `data`, for a test that calls train_model itself."""
    from tl.data import build_transforms, make_loaders
    from tl.engine.selection import image_datasets
    from tl.engine.weights import build_model
    from tl.loop import seed_everything

    seed_everything(seed)
    sets = image_datasets(data, build_transforms((0.5,) * 3, (0.5,) * 3, size=32, resize=36))
    model = build_model("tiny", len(sets["train"].classes), "none")
    return model, make_loaders(sets, 5, seed=seed)


# ----------------------------------------------------------------------------- networks
def seeded_tiny_net(seed: int) -> TinyNet:
    """A TinyNet initialised from `seed`."""
    torch.manual_seed(seed)
    return TinyNet()


def two_class_tiny_net():
    """A seeded TinyNet with a 2-class head."""
    torch.manual_seed(0)
    net = TinyNet()
    net.fc = nn.Linear(16, 2)
    return net


def frozen_tiny(prefix_extra: torch.nn.Module | None = None):
    """A TinyNet that trains its head alone, `prefix_extra` appended to the frozen block."""
    from tl.models import set_trainable

    net = TinyNet()
    if prefix_extra is not None:
        net.block.append(prefix_extra)
    set_trainable(net, get_backbone("tiny"), ["head"])
    return net


# ----------------------------------------------------------------------------- images and folders
def picture(path: Path, size=(40, 40), seed=0) -> Path:
    """A random RGB picture of `size` (width, height) saved at `path`."""
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def kaggle_folder(root: Path, n: int = 5) -> Path:
    """Kaggle's flat layout: root/cat.N.jpg and root/dog.N.jpg, `n` of each."""
    root.mkdir(parents=True)
    for name in ("cat", "dog"):
        for i in range(n):
            picture(root / f"{name}.{i}.jpg", (16, 16), seed=i)
    return root


def class_folders_only(root: Path, counts: dict[str, int]) -> Path:
    """root/<class>/*.png without a train/val split (the --val-split layout)."""
    for k, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            picture(root / name / f"{i:03d}.png", seed=100 * k + i)
    return root


def png_size(path, min_width=300):
    """The (width, height) of a PNG at least `min_width` wide."""
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width >= min_width
        return img.size


# ----------------------------------------------------------------------------- two runs compared
def without_timings(rows):
    """History rows without their timings, which differ between two runs of the same numbers."""
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in rows]


def assert_same_run(a, b):
    """Run folders `a` and `b` hold the same run: epochs, rows, weights, best.pth, results, history.csv."""
    ca, cb = checkpoint.load_checkpoint(a / "last.ckpt"), checkpoint.load_checkpoint(b / "last.ckpt")
    assert ca["epoch"] == cb["epoch"]
    assert without_timings(ca["history"]["rows"]) == without_timings(cb["history"]["rows"])
    assert ca["history"]["stopped_early"] == cb["history"]["stopped_early"]
    for name, tensor in ca["model"].items():
        assert torch.equal(tensor, cb["model"][name]), name
    best_a, best_b = checkpoint.load_state_file(a / "best.pth"), checkpoint.load_state_file(b / "best.pth")
    assert all(torch.equal(t, best_b[k]) for k, t in best_a.items())
    ra = json.loads((a / "config.json").read_text())["results"]
    rb = json.loads((b / "config.json").read_text())["results"]
    for key in ("best_val_acc", "best_epoch", "final_val_acc", "final_val_loss", "baseline_val_acc"):
        assert ra[key] == rb[key], key
    assert pd.read_csv(a / "history.csv").drop(columns=["seconds", "images_per_s"]).equals(
        pd.read_csv(b / "history.csv").drop(columns=["seconds", "images_per_s"]))
    for run_dir in (a, b):
        assert_recorded_digests_match(run_dir)


def assert_recorded_digests_match(run_dir):
    """Every weight file the run recorded in config.json is the file on disk (what --evaluate checks)."""
    checksums = json.loads((run_dir / "config.json").read_text())["checksums"]
    assert "best.pth" in checksums
    for name, digest in checksums.items():
        assert files.state_digest(checkpoint.load_state_file(run_dir / name)) == digest, (run_dir, name)


def failing_with(problem: str):
    """A stand-in for a run (or a range test) that fails with `problem`: "interrupt" (Ctrl-C),
    "full disk", "lock lost", "bad input" (a TLError) or "bug" (any other exception)."""
    import errno

    from tl import Interrupted, TLError
    from tl.engine.folder_lock import LockLost

    raised = {"interrupt": Interrupted("interrupted"), "full disk": OSError(errno.ENOSPC, "No space", "x"),
              "lock lost": LockLost("the lock was taken"), "bad input": TLError("no such thing"),
              "bug": ZeroDivisionError("a bug")}[problem]

    def fails(*args, **kwargs):
        raise raised

    return fails


def fill(disk: Path, pages: int) -> None:
    """Leave `pages` 4 KiB pages free on `disk` (a filler file, .filler, takes the rest)."""
    filler = disk / ".filler"
    filler.unlink(missing_ok=True)
    st = os.statvfs(disk)
    with contextlib.suppress(OSError), open(filler, "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - pages * 4096))
