"""Saving and loading: one state_dict format, one checkpoint format.

Documents 000, 002 and 004 show three ways to save a model. This project keeps the
two safe ones:

* a **state_dict** (`best.pth`, `00.pth`, ...): the tensors alone, keyed by parameter
  name. To use it you build the architecture in code and call `load_state_dict`;
* a **training checkpoint** (`last.ckpt`, a dict in the style of 004 §2.3 and the
  torchvision references): model and optimizer state, epoch, history, the resolved
  config, class names and RNG states - everything `--resume` needs to carry on
  exactly where the run stopped - and the **identity** of the run it belongs to (a run
  id, the recipe, the seed, the data's fingerprint; tl/engine/run_folder.py `new_identity`),
  fixed when the run's folder was made. --resume continues a checkpoint only in the folder
  whose config.json records the same identity (`check_own_checkpoint`). A checkpoint
  written before identities were recorded has none (`None`).

The third way, `torch.save(model)` (000, 004 §2.1), pickles the Python object itself.
Loading such a file runs arbitrary code from it, so everything here loads with
`torch.load(..., weights_only=True)`, which only accepts tensors and plain containers.

Every file is written atomically (tl/engine/files.py: a temporary file renamed over the
target), so a run killed at any instant leaves either the old file or the new one.

Atomic is not the same as intact: a disk or a copy can still flip bits inside a
file that loads without complaint. So every checkpoint carries a SHA-256 digest of
its contents (`state_digest`, tl/engine/files.py), `load_checkpoint` recomputes it, and
a run's config.json records the digest of each weight file it wrote, which `--evaluate`
checks before it scores that file.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tl import TLError
from tl.engine.files import atomic_save, state_digest

CHECKPOINT_FORMAT = "tl-checkpoint-v2"  # v2: a digest of the contents, scaler state, whole-run options


def _torch_load(path: str | os.PathLike, map_location: Any = "cpu", allow_pickle: bool = False) -> Any:
    path = Path(path)
    if path.is_dir():
        raise TLError(f"{path} is a folder; pass the weights file inside it (e.g. {path / 'best.pth'})")
    if not path.is_file():
        raise TLError(f"no such file: {path}")
    if path.stat().st_size == 0:
        raise TLError(f"{path} is an empty file (0 bytes), not saved weights: an interrupted copy? Use another file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if (exported := _exported_format(path, magic)) is not None:
        raise TLError(f"{path} is a model exported with --export ({exported}), not saved weights: --predict "
                      f"--checkpoint {path} reads it; here pass a run's .pth/.ckpt (the best.pth it was exported from)")
    # torch.save writes a zip archive ("PK\x03\x04"); older torch a raw pickle (protocol byte 0x80)
    if magic != b"PK\x03\x04" and not magic.startswith(b"\x80"):
        raise TLError(f"{path} is not a PyTorch file (it starts with {magic!r}, not a zip archive or a pickle): "
                      f"pass a .pth/.ckpt written by torch.save")
    try:
        # map_location="cpu": tensors saved from a GPU land on the CPU, whatever this machine has.
        return torch.load(path, map_location=map_location, weights_only=not allow_pickle)
    except pickle.UnpicklingError as exc:
        raise TLError(f"{path} is not a plain state_dict or checkpoint: it holds pickled Python objects "
                      f"(for instance a whole model saved with torch.save(model)). Loading it would run "
                      f"code from the file; only do that for files you made yourself, with --allow-pickle.\n"
                      f"  ({_first_line(exc, 160)})") from None
    except Exception as exc:  # noqa: BLE001 - a damaged file makes torch/pickle raise almost anything
        raise TLError(f"{path} is not a readable PyTorch file ({_first_line(exc, 200)}); "
                      f"is it complete? Use another copy") from None


def _exported_format(path: Path, magic: bytes) -> str | None:
    """The format of a file --export wrote (tl/engine/export.py), "onnx" or "torchscript"; else None."""
    if path.suffix == ".onnx":
        return "onnx"
    if magic != b"PK\x03\x04":
        return None
    try:
        with zipfile.ZipFile(path) as archive:  # its description, export.META_KEY, rides as an extra file
            return "torchscript" if any(name.endswith("/extra/tl_meta.json") for name in archive.namelist()) else None
    except (OSError, zipfile.BadZipFile):
        return None


def _first_line(exc: BaseException, limit: int) -> str:
    """The first line of an exception's message, or its type when the message is empty (EOFError)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:limit]}" if lines else type(exc).__name__


def load_state_file(path: str | os.PathLike, map_location: Any = "cpu", allow_pickle: bool = False) -> dict:
    """The model state_dict in `path`: a state_dict file, one of our checkpoints (the weights
    its val scored, `scored_weights`) or, with `allow_pickle`, a whole pickled model (its `.state_dict()`)."""
    obj = _torch_load(path, map_location, allow_pickle)
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict) and str(obj.get("format", "")).startswith("tl-checkpoint-"):
        obj = scored_weights(_checked(obj, path), path)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TLError(f"{path} does not hold a state_dict (a dict of tensors)")
    return obj


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """`model.load_state_dict(state)`, but a mismatch is explained in three lines
    (missing / unexpected / wrong-shaped tensors) instead of a wall of key names; `source`
    names the file in that error. It loads the weights of `tl.models.create_model` (as the
    `load` tl/engine/weights.py passes), a stacked model's file, a resumed checkpoint's model
    and a saved model rebuilt to be scored."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        lines = [f"{source} does not fit this model ({type(model).__name__}):"]
        if missing:
            lines.append(f"  {len(missing)} tensor(s) missing from the file, e.g. {', '.join(missing[:3])}")
        if unexpected:
            lines.append(f"  {len(unexpected)} tensor(s) the model does not have, e.g. {', '.join(unexpected[:3])}")
        for k, theirs, ours in shapes[:3]:
            lines.append(f"  {k}: file has shape {theirs}, model expects {ours}")
        if missing and unexpected:
            lines.append("  -> it was probably saved from another architecture (check --backbone)")
        elif shapes and not missing:
            lines.append("  -> same architecture, different sizes: probably another number of classes")
        raise TLError("\n".join(lines))
    model.load_state_dict(state)


# ----------------------------------------------------------------------------- training checkpoints
def rng_state(loader_generator: torch.Generator | None) -> dict:
    """Every random number generator a training epoch draws from."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if loader_generator is not None:
        state["loader"] = loader_generator.get_state()  # shuffling order and worker seeds
    return state


def set_rng_state(state: dict, loader_generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if loader_generator is not None and "loader" in state:
        loader_generator.set_state(state["loader"])


def _as_tuple(x):  # python's random state is nested tuples; keep it so after a round trip
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(path: str | os.PathLike, *, epoch: int, model: nn.Module, optimizer, scheduler, scaler,
                    history: dict, config: dict, classes: list[str], loader_generator: torch.Generator | None,
                    wall_seconds: float, stage: dict | None = None, ema: nn.Module | None = None,
                    identity: dict | None = None) -> Path:
    """Write the full training state after `epoch` (one dict; see the module docstring),
    with the digest of everything in it under "digest".

    `ema`: the run's average of the weights (tl/engine/ema.py), an `AveragedModel` whose
    state (its module's weights and buffers, and `n_averaged`) lets a resumed run continue it.

    `stage` ({"index", "end"}) says which stage of a staged recipe (tl/stages.py) the
    optimizer and scheduler belong to, and where that stage's epochs end: resume restores
    them only into that stage, and refuses a new epoch total that would bend its schedule.

    `identity`: the run the checkpoint belongs to, as its folder's config.json records it
    (see the module docstring)."""
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,  # fp16 loss scale
        "history": history,
        # plain JSON types only: weights_only loading rejects any other Python object
        "config": json.loads(json.dumps(config, default=str)),
        "classes": classes,
        "rng": rng_state(loader_generator),
        "wall_seconds": wall_seconds,  # training time of the whole run so far, across resumes
        "stage": stage if stage is not None else {"index": 0, "end": None},  # whose optimizer this is
        "ema": ema.state_dict() if ema is not None else None,  # the average of the weights (--ema), or None
        "identity": identity,  # whose run this is: resumed only in that run's folder
    }
    ckpt["digest"] = state_digest(ckpt)
    return atomic_save(ckpt, path)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """A training checkpoint written by `save_checkpoint`, checked for its format and digest."""
    ckpt = _torch_load(path, map_location)
    if not isinstance(ckpt, dict) or not str(ckpt.get("format", "")).startswith("tl-checkpoint-"):
        raise TLError(f"{path} is not a training checkpoint of this project (expected a last.ckpt "
                      f"written by main.py; a .pth file holds weights only and cannot be resumed)")
    return _checked(ckpt, path)


def _checked(ckpt: dict, path) -> dict:
    """`ckpt` without its digest, after checking that the digest matches its contents."""
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise TLError(f"{path} was written by an older version of this project ({ckpt['format']}, this one "
                      f"reads {CHECKPOINT_FORMAT}); start the run again, or score its best.pth with --evaluate")
    digest = ckpt.pop("digest", None)
    if digest != state_digest(ckpt):
        raise TLError(f"{path} is damaged: its contents do not match the digest written with it "
                      f"(a disk or copy error changed it). It cannot be resumed or scored safely; "
                      f"use the run's best.pth, or start the run again")
    return ckpt


def scored_weights(ckpt: dict, path: str | os.PathLike = "this checkpoint") -> dict:
    """The weights val scored at the checkpoint's epoch: the average's where the run keeps an
    average of the weights (--ema, tl/engine/ema.py), else the model's own."""
    if ckpt.get("ema") is None:
        return ckpt["model"]
    check_ema_state(ckpt["ema"], path)
    return {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k.startswith("module.")}


def check_ema_state(state, path: str | os.PathLike = "this checkpoint") -> None:
    """Stop unless `state` is an AveragedModel's state_dict: tensors, the module's under "module."."""
    if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
            and any(isinstance(k, str) and k.startswith("module.") for k in state)):
        raise TLError(f"{path}: its average of the weights (\"ema\") is not the state of an average "
                      f"(a dict of tensors): the file was edited or damaged; use the run's best.pth, "
                      f"or start the run again")


def verify_state_file(path: str | os.PathLike, state: dict, expected: str | None) -> None:
    """Stop if `state` (loaded from `path`) does not match the digest a run recorded for it."""
    if expected is not None and state_digest(state) != expected:
        raise TLError(f"{path} is damaged or was replaced: its tensors do not match the digest its run "
                      f"recorded in config.json")
