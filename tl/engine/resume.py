"""Resume: the options a saved run continues with, and the state it is restored to."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from tl import TLError
from tl.engine import checkpoint, distributed
from tl.engine.class_names import how_names_differ
from tl.engine.options import RunOptions, as_saved
from tl.engine.run_folder import has_results
from tl.engine.schema import CONFIG, check
from tl.loop import History

# Options that may differ when a run is resumed: they cannot change what the run computes
# (a new total of --epochs only adds epochs). Every other option is restored from the
# checkpoint; giving it a different value is an error rather than silently ignored.
RESUME_SAFE = ("epochs", "device", "progress")


def resume_options(ckpt: dict, given: dict, source: Path) -> RunOptions:
    """The options of the run saved in `ckpt`, with the safe ones in `given` applied.

    `given` holds only what the user actually typed (as RunOptions fields). `data` may name
    another path to the same images (run() checks the files); anything else that differs
    from the saved run stops with a message, because it would change the result."""
    # the options as saved, within the bounds of tl/engine/schema.py (one error: line per option that is not)
    check(ckpt["config"], {"options": CONFIG["options"]}, f"{source}: ")  # with how they fit one another
    # an option newer than the checkpoint had its default value in that run
    saved = {f.name: as_saved(f.default) for f in dataclasses.fields(RunOptions)
             if f.default is not dataclasses.MISSING} | dict(ckpt["config"]["options"])
    conflicts = [f"{k.replace('_', '-')} {v} (the run has {saved.get(k)})" for k, v in given.items()
                 if k not in (*RESUME_SAFE, "data") and as_saved(v) != saved.get(k)]
    if conflicts:
        raise TLError(f"{source} continues a run with its own options; these would change its result: "
                      f"{'; '.join(conflicts)}.\n  Resume with only --epochs, --device or --no-progress, "
                      f"or start a new run with the new options")
    saved.update({k: v for k, v in given.items() if k in (*RESUME_SAFE, "data")})
    for key in ("data", "out"):
        saved[key] = Path(saved[key])
    opts = RunOptions(**saved)
    # as saved, even where __post_init__ would now decide otherwise (a device_images run made through
    # the API before it forced workers 0 ran its feature pass with its workers): the run continues as it began
    opts.workers, opts.image_cache = saved["workers"], saved["image_cache"]
    return opts


def restore_threads(config: dict, log) -> None:
    """The CPU thread count the run trained with (config["threads"]), set again: a sum split
    over another number of threads rounds differently, so without it a resumed run would
    differ from an uninterrupted one in the last bits (1e-4 in a val loss after a few epochs).
    A checkpoint from before the count was recorded continues on this process's count, which
    is recorded from now on."""
    saved, now = config.get("threads"), torch.get_num_threads()
    if saved is None:
        config["threads"] = now
        log(f"CPU threads: {now} (the checkpoint does not say how many the run had; if it was another "
            f"count, the last bits of the numbers may differ from an uninterrupted run)")
        return
    if saved != now:
        torch.set_num_threads(saved)
    log(f"CPU threads: {saved}, as the run was trained" + (f" (this process had {now})" if saved != now else ""))


def how_to_continue(ckpt: dict, finished: bool) -> str:
    """The advice for a resume whose --epochs cannot be used. A stage with a learning-rate
    schedule laid it out for the total the run started with (start_stage refuses to bend it),
    so such a run continues only to that total; a constant-rate stage can take a larger one."""
    total, schedule = ckpt["config"].get("train_epochs", ckpt["epoch"]), schedule_of(ckpt)
    if schedule == "constant":
        return (f"pass the new total, larger than {ckpt['epoch']}, to train more"
                + ("" if finished else ", or leave out --epochs to continue it"))
    if finished:
        return (f"its {schedule} schedule was laid out for those {total} epochs and has ended; "
                f"to train longer, start a new run with a larger --epochs")
    return f"its {schedule} schedule was laid out for {total} epochs: leave out --epochs to continue it"


def schedule_of(ckpt: dict) -> str:
    """The learning-rate schedule of the stage the checkpoint was saved in, as config.json names
    it (OneCycleLR, LambdaLR, ...), or "constant"."""
    index = ckpt.get("stage", {}).get("index", 0)
    stage = next((s for s in ckpt["config"].get("stages", []) if s["index"] == index), {})
    return stage.get("schedule", "constant")


def restore(ckpt: dict, resume: Path, model: nn.Module, scaler, generator: torch.Generator,
             classes: list[str], fingerprint: str, num_epochs: int, data: str) -> tuple[History, int, float]:
    """Put a saved run back exactly as it was after its last epoch: weights, scaler, RNG
    states and history (with the best epoch's weights). Returns (history, first epoch to
    run, wall seconds already spent). The optimizer and scheduler belong to a stage: they
    come back when that stage starts (`start_stage`). `data`: the folder the images were read from now.
    A run with every epoch trained (or stopped early) is refused once its folder holds its
    results; without them (it was killed while writing them) it is restored to write them."""
    config = ckpt["config"]
    if ckpt["classes"] != classes:
        raise TLError(f"{resume} was trained on classes {ckpt['classes']}, but the data has {classes}"
                      + how_names_differ(ckpt["classes"], classes, "the checkpoint", "the data"))
    if config.get("data_fingerprint") != fingerprint:
        started = config["options"]["data"]
        began = "" if str(started) == str(data) else f" (it started on {started})"
        raise TLError(f"{resume} was trained on other images than {data} holds now{began} (files, labels or "
                      f"sizes differ); resume it on the data it started with")
    history = History.from_dict(ckpt["history"])
    start_epoch = ckpt["epoch"] + 1
    if history.stopped_early is not None and has_results(resume.parent):
        raise TLError(f"{resume}: the run stopped early after epoch {history.stopped_early} (--patience); "
                      f"there is nothing to resume")
    if history.stopped_early is not None and num_epochs != config.get("train_epochs", num_epochs - 1) + 1:
        raise TLError(f"{resume}: the run stopped early after epoch {history.stopped_early} (--patience) and "
                      f"trains no more; resume it without --epochs to write its results")
    if start_epoch > num_epochs:
        raise TLError(f"{resume} has trained {ckpt['epoch']} epochs, more than --epochs {num_epochs - 1}; "
                      + how_to_continue(ckpt, has_results(resume.parent)))
    if config.get("world_size", 1) != distributed.world_size():  # [DDP] shards and batches depend on it
        raise TLError(f"{resume} was trained by {config.get('world_size', 1)} process(es), this is "
                      f"{distributed.world_size()}: resume it with the same torchrun --nproc_per_node x --nnodes")
    if start_epoch >= num_epochs and has_results(resume.parent):
        raise TLError(f"{resume} has already trained all {num_epochs - 1} epochs; " + how_to_continue(ckpt, True))
    checkpoint.load_into(model, ckpt["model"], str(resume))
    if ckpt["scaler"] is not None:
        scaler.load_state_dict(ckpt["scaler"])
    if history.best_epoch == ckpt["epoch"]:
        history.best_state = checkpoint.scored_weights(ckpt, resume)  # that epoch's, as val scored them (end_of_epoch)
    elif history.best_epoch >= 0:
        best_path = resume.parent / "best.pth"
        history.best_state = checkpoint.load_state_file(best_path)
        checkpoint.verify_state_file(best_path, history.best_state, config.get("checksums", {}).get("best.pth"))
    checkpoint.set_rng_state(ckpt["rng"], generator)
    return history, start_epoch, ckpt["wall_seconds"]
