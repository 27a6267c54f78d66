"""The run folder and what it records: config.json, history.csv, the weight files and the
checkpoint after every epoch; at the end the headline (tl/engine/headline.py), its
classification report (tl/engine/metrics.py) and the pictures (tl/engine/plots.py).

`RunFolder` is the run's folder as one object: it is opened (a new folder, or the one a
resumed run continues in), saves after every epoch (the loop's `end_of_epoch` hook), tidies
up when training fails, and writes the results when training ends.

A run folder promises two things:

* **One writer.** The process that runs it holds the folder's lock (`one_writer`,
  tl/engine/folder_lock.py) from the moment the folder is made or reopened by --resume until
  the run ends. A second process that wants it (a second --resume of the same run) stops at
  once with one error that names the holder, and writes nothing there.
* **Its own checkpoints only.** When the folder is made, config.json records the run's
  identity (`new_identity`: a random run id, the recipe, the seed, the data's fingerprint),
  and every checkpoint the run writes carries it. --resume continues a checkpoint only in
  the folder whose config.json names the same identity (`check_own_checkpoint`): another
  run's last.ckpt copied in is refused, even with the same recipe, data and epoch. last.ckpt
  is written before the other files of its epoch, and the identity never changes, so a run
  killed between those writes still resumes. A folder made before identities were recorded
  (no identity in config.json) resumes a checkpoint that has none either.
* **Its results last.** `finish` writes config.json with the results after every other file
  of the run, so a folder whose config.json holds results is complete. A run killed while
  finishing, with every epoch trained, is finished by --resume (`has_results`): the run is
  restored and its results are written, the same as an uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import platform
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from tl import Interrupted, TLError
from tl.engine import checkpoint, distributed, folders, metrics, schema
from tl.engine.backbones import folder_label
from tl.engine.balance import class_counts
from tl.engine.command import is_interrupt, stop_if_interrupted
from tl.engine.early_stopping import should_stop
from tl.engine.files import atomic_save, remove_stale_temporaries, state_digest, write_json
from tl.engine.folder_lock import FolderBusy, LockLost, held_here, hold
from tl.engine.headline import score_headline
from tl.engine.options import RunOptions, as_saved
from tl.engine.tables import write_table
from tl.loop import History, NonFiniteLoss
from tl.models import Backbone, parameter_table
from tl.recipe import Recipe
from tl.stages import Span, describe


class RunFolder:
    """The folder of one run and its config record (see the module docstring)."""

    def __init__(self, run_dir: Path, config: dict, ctx, stage):
        self.run_dir, self.config, self.ctx, self.stage = run_dir, config, ctx, stage
        self.started = time.time()
        self.held = contextlib.ExitStack()  # the folder's lock (`one_writer`), released by __exit__

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.held.close()

    @classmethod
    def open(cls, ctx, stage, ckpt: dict | None, resume: Path | None) -> RunFolder:
        """Created only now that everything can start; a resumed run continues in its own folder,
        and only with its own checkpoint. Held by this process alone until the `with` block
        that uses the returned folder ends (see the module docstring)."""
        with contextlib.ExitStack() as held:
            folder = cls._open(ctx, stage, ckpt, resume, held)
            folder.held = held.pop_all()
        return folder

    @classmethod
    def _open(cls, ctx, stage, ckpt: dict | None, resume: Path | None, held: contextlib.ExitStack) -> RunFolder:
        opts, recipe = ctx.opts, ctx.recipe
        if ckpt is not None:
            run_dir = Path(resume).parent
            held.enter_context(one_writer(run_dir, unless_held=True))  # resume_run holds it from the start
            check_own_checkpoint(ckpt, Path(resume))  # under the lock, before anything here is written
            if distributed.is_main():  # [DDP]
                remove_stale_temporaries(run_dir)  # a save killed mid-write left these
                for name, state in files_of_saved_epoch(ckpt, ctx.history, opts).items():
                    atomic_save(state, run_dir / name)  # a kill after last.ckpt may have cut these off
            config = ckpt["config"]
            config["resumed"] = [*config.get("resumed", []), {"after_epoch": ckpt["epoch"], "device": str(ctx.device),
                                                              "time": time.strftime("%Y-%m-%d %H:%M:%S")}]
            config["options"] = options_record(opts)  # the new --epochs total, where the data lies now
            config["recipe"] = dataclasses.asdict(recipe)
            ctx.log(f"resuming {run_dir} after epoch {ckpt['epoch']}")
        else:
            name = opts.run_name or f"{recipe.name}-{folder_label(recipe.backbone)}-{time.strftime('%Y%m%d-%H%M%S')}"
            # [DDP] process 0 makes the folder, the others take its name
            run_dir = distributed.from_main(make_run_dir(Path(opts.out), name, explicit=opts.run_name is not None)
                                            if distributed.is_main() else None)
            held.enter_context(one_writer(run_dir))
            identity = distributed.from_main(new_identity(recipe.name, opts.seed, ctx.fingerprint))  # [DDP] 0's
            config = run_config(recipe, opts, ctx.spec, ctx.device, ctx.model, stage.optimizer, ctx.sets,
                                ctx.classes) | {"data_fingerprint": ctx.fingerprint, "checksums": {},
                                                "identity": identity}
        config["train_epochs"] = recipe.train_epochs
        folder = cls(run_dir, config, ctx, stage)
        folder.record_stage(ctx, stage)
        config["world_size"] = distributed.world_size()  # processes; each trains on batch_size images per step
        if distributed.is_main():  # [DDP]
            write_json(run_dir / "config.json", config)
        return folder

    def record_stage(self, ctx, stage) -> None:
        record_stage(self.config, stage.span, stage.optimizer, stage.scheduler, stage.plan.mode, staged=ctx.staged,
                     cached_phases=sorted(stage.plan.cached))

    def end_of_epoch(self, epoch: int, hist: History) -> bool:
        """After every epoch: the checkpoint, this epoch's weight files, history.csv and config.json;
        then early stopping (tl/engine/early_stopping.py): True asks the loop to stop."""
        opts = self.ctx.opts
        stop = should_stop(opts.patience, epoch, hist.best_epoch)
        if not distributed.is_main():  # [DDP] only process 0 writes; the rows, so the stop, are the same on all
            return stop
        files = {}  # weight files of this epoch: best.pth, and 001's / 004's per-epoch files
        if hist.best_epoch == epoch:
            files["best.pth"] = hist.best_state
        if opts.save_every_epoch:
            scored = self.ctx.model if self.ctx.ema is None else self.ctx.ema.module  # the weights val scored
            files[epoch_file_name(epoch, hist.rows[-1], opts.informative_names)] = scored.state_dict()
        for name, state in files.items():  # their digests first: the checkpoint's config carries them
            self.config["checksums"][name] = state_digest(state)
        # last.ckpt before the files: if the run is killed in between, the checkpoint already holds
        # this epoch's weights, and resume writes the files again from it (RunFolder.open)
        span = self.stage.span
        checkpoint.save_checkpoint(self.run_dir / "last.ckpt", epoch=epoch, model=self.ctx.model,
                                   optimizer=self.stage.optimizer, scheduler=self.stage.scheduler,
                                   scaler=self.ctx.scaler, config=self.config,
                                   history=hist.to_dict() | ({"stopped_early": epoch} if stop else {}),  # as the loop
                                   # will record it: a resume of this checkpoint knows the run is over
                                   classes=self.ctx.classes, loader_generator=self.ctx.generator,
                                   stage={"index": span.index, "end": span.end}, wall_seconds=self.wall_seconds(),
                                   ema=self.ctx.ema, identity=self.config.get("identity"))
        for name, state in files.items():
            atomic_save(state, self.run_dir / name)
        write_history_csv(hist, self.run_dir / "history.csv")
        write_json(self.run_dir / "config.json", self.config)
        stop_if_interrupted()  # a Ctrl-C or SIGTERM whose exception Python swallowed stops the run here
        return stop

    def wall_seconds(self) -> float:
        return self.ctx.wall_before + time.time() - self.started

    @contextlib.contextmanager
    def tidy_on_failure(self, resumed: bool):
        """A new run that failed before its first training epoch (a broken file, Ctrl-C) has nothing
        worth keeping; a NaN loss keeps its last good checkpoint, which its message points to."""
        try:
            yield
        except BaseException as exc:
            if not distributed.is_main() or isinstance(exc, LockLost):  # [DDP] process 0 alone tidies;
                raise  # a folder whose lock was taken away may be another process's now: left alone
            last = self.run_dir / "last.ckpt"
            trained = last.exists() and (resumed or checkpoint.load_checkpoint(last)["epoch"] > 0)
            if not trained and not (last.exists() and isinstance(exc, NonFiniteLoss)):
                shutil.rmtree(self.run_dir, ignore_errors=True)
            if is_interrupt(exc):  # its KeyboardInterrupt, or what failed of it
                if not trained:
                    raise Interrupted("interrupted before the first training epoch finished: nothing was saved") \
                        from None
                raise Interrupted(f"interrupted: {last} holds the last completed epoch.\n"
                                  f"  continue with: python main.py --resume {last}") from None
            raise

    def finish(self, ctx, history: History) -> None:
        """The results (`write_results`). Ctrl-C or SIGTERM while they are written leaves the
        trained run, and says how its --resume writes them."""
        try:
            self.write_results(ctx, history)
        except BaseException as exc:
            if not is_interrupt(exc):
                raise
            last = self.run_dir / "last.ckpt"
            raise Interrupted(f"interrupted while its results were written: {last} holds the trained run.\n"
                              f"  write them with: python main.py --resume {last}") from None

    def write_results(self, ctx, history: History) -> None:
        """The results: the headline number (never chosen on the images it is scored on),
        config.json and history.csv, the best model handed back, the pictures."""
        # the model val scored: the loop's own net, or the average of the weights (--ema)
        net = distributed.unwrap(self.stage.net) if self.stage.scored is None else self.stage.scored  # [DDP]
        cached = self.stage.plan.cached
        config = self.config
        config["results"] = summarize(history) | {"wall_seconds": self.wall_seconds()}
        # the test accuracy of the epoch chosen on val where there is a test/ split, else the final
        # epoch's val accuracy. Must run here, while `model` still holds the final epoch's weights.
        headline = score_headline(net, ctx.model, history, cached.get("val", ctx.sets["val"]), ctx.sets["val"],
                                  ctx.test_set, ctx.classes, ctx.opts, ctx.device, self.run_dir, ctx.recipe.tta)
        config["results"] |= headline.record
        write_history_csv(history, self.run_dir / "history.csv")
        report = metrics.report_of_predictions(self.run_dir / "headline_predictions.csv", ctx.classes)
        page = metrics.write_report(self.run_dir, report, f"{self.run_dir.name}, {config['results']['headline']}")
        if history.best_state is not None:
            ctx.model.load_state_dict(history.best_state)  # hand back the best model, as 002's tutorial does
        if ctx.opts.plots:
            try:
                from tl.engine.plots import write_run_plots  # matplotlib is imported only to draw

                write_run_plots(self.run_dir, history, headline, ctx.classes, ctx.spec)
            except OSError:  # a full disk, no permission: the command's one error: line says where (exit 2)
                ctx.log(f"the run's training is saved in {self.run_dir}, its pictures could not be written; once "
                        f"there is room, python main.py --resume {self.run_dir / 'last.ckpt'} writes its results")
                raise
            except Exception as exc:  # noqa: BLE001 - the run is saved; a picture must never lose it
                ctx.log(f"warning: the run's pictures could not be drawn ({type(exc).__name__}: {exc}); "
                        f"its results are saved in {self.run_dir}")
        write_json(self.run_dir / "config.json", config)  # last: a folder whose config.json has its results
        # has them all, and --resume writes them again for a run killed before this line (`has_results`)
        res = config["results"]
        ctx.log(f"classification report of the headline model: macro-F1 {report['macro_f1']:.4f}, balanced accuracy "
                f"{report['balanced_accuracy']:.4f} -> {page}")
        ctx.log(f"headline acc {res['headline_acc']:.4f} ({res['headline']}); best val acc {history.best_acc:.4f} "
                f"at epoch {history.best_epoch} (selected on val) -> {self.run_dir}")


LOCK_NAME = ".run.lock"  # the run folder's lock file (tl/engine/folder_lock.py), empty while no one runs it


@contextlib.contextmanager
def one_writer(run_dir: Path, unless_held: bool = False) -> Iterator[None]:
    """This process alone writes `run_dir` while the block runs: a second process that asks
    (a second --resume of the run) stops at once with a `FolderBusy` error (one line, exit 2)
    that names this one (process id, command, machine, since when). A stop, not a wait: the
    second of two resumes would continue from a checkpoint the first has since replaced.
    `unless_held`: nothing to do where this process holds the folder already (`resumed`).
    [DDP] Process 0 holds it for all, and its answer is every process's.
    (Windows: folders are not locked; see tl/engine/folder_lock.py.)"""
    with contextlib.ExitStack() as held:
        busy = None
        if distributed.is_main() and not (unless_held and held_here(run_dir, LOCK_NAME)):
            try:
                held.enter_context(hold(run_dir, LOCK_NAME, wait=False))
            except FolderBusy as exc:
                busy = str(exc)
        if (busy := distributed.from_main(busy)) is not None:
            raise FolderBusy(busy)
        yield


def held_if_run_folder(folder: Path | None) -> contextlib.AbstractContextManager:
    """`one_writer(folder)` where `folder` is a run folder (it holds config.json), else nothing:
    for the commands that write into a run's folder after it (--evaluate, --explain, --export),
    which stop at once while a run still writes it, rather than read a best.pth whose
    config.json is not yet written."""
    is_run = folder is not None and (Path(folder) / "config.json").is_file()
    return one_writer(Path(folder)) if is_run else contextlib.nullcontext()


@contextlib.contextmanager
def resumed(path: Path) -> Iterator[dict]:
    """The checkpoint `path` (a last.ckpt), read while this process holds its run folder
    (`one_writer`, so the checkpoint read is the folder's latest and no other process writes
    the folder until the block ends), and checked to be the folder's own (`check_own_checkpoint`).
    A folder without config.json is no run folder: it is neither locked nor written."""
    path = Path(path)
    if not (path.parent / "config.json").is_file():
        check_own_checkpoint(checkpoint.load_checkpoint(path), path)  # the file's own fault first, else no config
    with one_writer(path.parent):
        ckpt = checkpoint.load_checkpoint(path)
        check_own_checkpoint(ckpt, path)
        yield ckpt


def has_results(run_dir: Path) -> bool:
    """Whether the run in `run_dir` has written its results: `finish` writes config.json with them
    after every other file, so a run killed while finishing has a config.json without them."""
    try:
        config = schema.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("results"), dict)


def new_identity(recipe: str, seed: int, fingerprint: str) -> dict:
    """The identity of a new run, fixed when its folder is made: config.json and every
    checkpoint of the run carry it (see the module docstring)."""
    return {"run_id": uuid.uuid4().hex, "recipe": recipe, "seed": seed, "data_fingerprint": fingerprint}


def check_own_checkpoint(ckpt: dict, path: Path) -> None:
    """Stop unless the checkpoint `path` (loaded: `ckpt`) belongs to the run whose folder it
    lies in: its identity equals the one in that folder's config.json (both absent: a folder
    and checkpoint from before identities were recorded). Epoch, digest and file names are
    never taken as proof: a copy of another run's last.ckpt has them all."""
    folder, theirs = Path(path).parent, ckpt.get("identity")
    try:
        config = schema.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise TLError(f"{folder} has no config.json, so it is not the folder of the run {path} belongs to; "
                      f"resume a checkpoint in its own run's folder") from None
    except ValueError as exc:  # not UTF-8, not JSON, nested too deeply
        raise TLError(f"{folder / 'config.json'} is not readable JSON ({exc}); the run cannot be resumed "
                      f"without it") from None
    if not isinstance(config, dict):
        raise TLError(f"{folder / 'config.json'} holds no JSON object; the run cannot be resumed without it")
    own = config.get("identity")
    if theirs != own:
        raise TLError(f"{path} is not this folder's checkpoint: it belongs to {_describe(theirs)}, and "
                      f"{folder / 'config.json'} to {_describe(own)}; a run folder resumes only its own "
                      f"checkpoints: resume it in the folder of its own run")


def _describe(identity) -> str:
    if identity is None:
        return "no recorded run (written before runs recorded their identity)"
    if not isinstance(identity, dict):
        return f"an unreadable identity ({str(identity)[:40]})"
    return (f"run {str(identity.get('run_id'))[:12]} ({identity.get('recipe')}, seed {identity.get('seed')}, "
            f"data {str(identity.get('data_fingerprint'))[:12]})")


def data_fingerprint(sets: dict) -> str:
    """A digest of which files (relative to their split folder), with which labels and which
    contents, each phase holds: the identity of the data a run trained on, wherever it lies.
    (Reading every file once costs about what one epoch's decoding does.)"""
    h = hashlib.sha256()
    for phase in sorted(sets):
        ds = sets[phase]
        for path, target in ds.samples:
            h.update(f"{phase}|{target}|".encode() + os.fsencode(os.path.relpath(path, ds.root)) + b"|")
            h.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return h.hexdigest()


def make_run_dir(out: Path, name: str, explicit: bool) -> Path:
    """Create the run folder, atomically and for this run alone: `mkdir` fails if the name
    exists, so two runs started in the same second never share a folder. A generated name
    gets a suffix (-2, -3, ...); a name the caller chose is never reused."""
    folders.make(out)
    for i in range(1, 1000):
        run_dir = out / (name if i == 1 else f"{name}-{i}")
        try:
            folders.make(run_dir, exist_ok=False)
            return run_dir
        except FileExistsError:
            if explicit:
                raise TLError(f"{run_dir} already exists; resume it with --resume {run_dir / 'last.ckpt'} "
                              f"or choose another --out") from None
    raise TLError(f"{out} already holds 999 runs named {name}-N; choose another --out")


def epoch_file_name(epoch: int, val_row: dict, informative: bool) -> str:
    """001's `03.pth`, or 004's name that carries the val figures, `epoch03-loss0.1820-acc0.9412.pth`."""
    return (f"epoch{epoch:02d}-loss{val_row['loss']:.4f}-acc{val_row['acc']:.4f}.pth" if informative
            else f"{epoch:02d}.pth")


def files_of_saved_epoch(ckpt: dict, history: History, opts: RunOptions) -> dict:
    """The weight files the run wrote right after its checkpoint's epoch: all equal to the
    weights that epoch's val scored (the model's, or its average's with --ema)."""
    files, scored = {}, checkpoint.scored_weights(ckpt)
    if history.best_epoch == ckpt["epoch"]:
        files["best.pth"] = scored
    if opts.save_every_epoch:
        files[epoch_file_name(ckpt["epoch"], history.rows[-1], opts.informative_names)] = scored
    return files


def record_stage(config: dict, span: Span, optimizer, scheduler, cache_mode: str, staged: bool,
                  cached_phases: list[str]) -> None:
    """The stage that starts, in config.json: its epochs, rates, schedule and feature cache
    (and which phases it caches, so a resume inside it caches no other).
    A staged run's `feature_cache` and `trainable_params` then speak for all its stages."""
    entry = describe(span, optimizer, scheduler) | {"index": span.index, "feature_cache": cache_mode,
                                                    "cached_phases": cached_phases}
    config["stages"] = [s for s in config.get("stages", []) if s["index"] != span.index] + [entry]
    config["feature_cache"] = cache_mode
    if staged:
        config["feature_cache"] = "; ".join(f"{s['name']}: {s['feature_cache']}" for s in config["stages"])
        config["trainable_params"] = max(s["trainable_params"] for s in config["stages"])


def summarize(history: History) -> dict:
    """The figures a comparison needs, computed from the history rows alone."""
    val = history.val()
    train = [r for r in history.rows if r["phase"] == "train"]
    seconds = sum(r["seconds"] for r in train)
    images = sum(r["images_per_s"] * r["seconds"] for r in train)
    return {
        "baseline_val_acc": val[0]["acc"] if val and val[0]["epoch"] == 0 else None,
        "best_val_acc": history.best_acc,
        "best_epoch": history.best_epoch,
        "final_val_acc": val[-1]["acc"] if val else None,
        "final_val_loss": val[-1]["loss"] if val else None,
        "train_seconds": seconds,
        "train_images_per_s": images / seconds if seconds else None,
        "stopped_early": history.stopped_early,
    }


def run_config(recipe: Recipe, opts: RunOptions, spec: Backbone, device: torch.device, model: nn.Module,
            optimizer: torch.optim.Optimizer, sets: dict, classes: list[str]) -> dict:
    total = parameter_table(model)[-1]
    return {
        "experiment": recipe.name,
        "recipe": dataclasses.asdict(recipe),
        "options": options_record(opts),
        "weights_kind": weights_kind(recipe.weights, spec),
        "optimizer": type(optimizer).__name__,
        "param_groups": [{"name": g.get("name", str(i)), "lr": g["lr"],
                          "params": sum(p.numel() for p in g["params"])}
                         for i, g in enumerate(optimizer.param_groups)],
        "trainable_params": total["trainable"],
        "total_params": total["total"],
        "classes": classes,
        "dataset_sizes": {p: len(ds) for p, ds in sets.items()},
        "train_class_counts": dict(zip(classes, class_counts(sets["train"].targets, len(classes)))),
        "device": str(device),
        "threads": torch.get_num_threads(),  # CPU sums split over threads: resume restores the count
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def options_record(opts: RunOptions) -> dict:
    return {k: as_saved(v) for k, v in dataclasses.asdict(opts).items()}


def weights_kind(weights: str, spec: Backbone) -> str:
    if weights == "imagenet":
        return "packaged" if spec.weights_source == "packaged" else "imagenet"
    return "none" if weights in ("none", None) else "file"


def write_history_csv(history: History, path: Path) -> None:
    write_table(path, history.rows, ["epoch", "phase", "loss", "acc", "seconds", "images_per_s"])
