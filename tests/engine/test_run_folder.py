"""tl/engine/run_folder.py: a run folder has one writer and resumes only its own checkpoints.

* One writer: while a run (new or resumed) writes its folder, a second process that wants it
  (`python main.py --resume` of the same run, in this process or a real other one) stops at
  once with one `error:` line naming the holder, exit 2, and changes nothing, as do the
  commands that write into a run folder (--evaluate, --export, --explain); a run killed
  with SIGKILL leaves the folder resumable.
* Its own checkpoints: config.json and every checkpoint carry the run's identity; another
  run's last.ckpt copied into the folder (same recipe and data, another seed, another recipe,
  one from before identities, a folder from before identities, a folder without config.json)
  is refused, byte for byte nothing changed; a run killed between writing last.ckpt and its
  other files resumes to exactly the uninterrupted result; an old folder resumes its old checkpoint.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import main
import tl.engine.metrics
import tl.engine.plots
import tl.engine.run_folder
from tests.fixtures.make_tiny_run import DATA, RUN
from tl.engine import checkpoint
from tl.engine.run_folder import LOCK_NAME, one_writer

ROOT = Path(__file__).resolve().parents[2]
TIMINGS = ("seconds", "images_per_s")


def _train(data: Path, out: Path, epochs: int, *extra: str, recipe: str = "resnet_scratch", backbone: str = "tiny",
           code: int = 0) -> Path:
    argv = ["-e", recipe, "-b", backbone, "--data", str(data), "--out", str(out), "--epochs", str(epochs),
            "--weights", "none", "--image-size", "32", "--lr-scale", "50", "--batch-size", "5", "--no-progress",
            *extra]
    assert main.main(argv) == code
    (run_dir,) = out.iterdir()
    return run_dir


def _resume(capsys, run_dir: Path, *extra: str) -> tuple[int, str, str]:
    code = main.main(["--resume", str(run_dir / "last.ckpt"), "--no-progress", *extra])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too: the lock file) and its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _names_holder(line: str, pid: int, command: str) -> None:
    """The error names the holding process: its id, its command, its machine, since when."""
    assert f"is being written by process {pid} (" in line, line
    assert command in line and f"on {socket.gethostname()}, since 20" in line, line


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]


# ----------------------------------------------------------------------------- the identity
def test_a_run_records_its_identity_and_every_checkpoint_carries_it(tiny_data, tiny_backbone, tmp_path, capsys):
    a, b = _train(tiny_data, tmp_path / "a", 1), _train(tiny_data, tmp_path / "b", 1)
    config = json.loads((a / "config.json").read_text())
    identity = config["identity"]
    assert set(identity) == {"run_id", "recipe", "seed", "data_fingerprint"}
    assert len(identity["run_id"]) == 32 and int(identity["run_id"], 16) >= 0
    assert (identity["recipe"], identity["seed"], identity["data_fingerprint"]) == (
        "resnet_scratch", 0, config["data_fingerprint"])
    assert checkpoint.load_checkpoint(a / "last.ckpt")["identity"] == identity
    twin = json.loads((b / "config.json").read_text())["identity"]  # the same recipe, seed and data
    assert twin["run_id"] != identity["run_id"] and {**twin, "run_id": None} == {**identity, "run_id": None}
    assert _resume(capsys, a, "--epochs", "2")[0] == 0
    assert json.loads((a / "config.json").read_text())["identity"] == identity  # fixed when the folder was made
    assert checkpoint.load_checkpoint(a / "last.ckpt")["identity"] == identity
    assert (a / LOCK_NAME).read_text() == ""  # released at the end of the run


# ----------------------------------------------------------------------------- one writer
def test_a_resume_of_a_folder_another_writer_holds_stops_at_once(tiny_data, tiny_backbone, tmp_path, capsys):
    run_dir = _train(tiny_data, tmp_path / "runs", 1)
    capsys.readouterr()
    with one_writer(run_dir):  # this process holds it, as a running run does
        before = _files(run_dir)
        code, out, err = _resume(capsys, run_dir, "--epochs", "3")
        assert _files(run_dir) == before
    assert code == 2 and out == ""  # nothing read or said before the refusal
    _names_holder(_one_error_line(err), os.getpid(), "pytest")
    assert _resume(capsys, run_dir, "--epochs", "2")[0] == 0  # released: the folder resumes


def test_a_second_writer_stops_while_a_new_run_writes_its_folder(tiny_data, tiny_backbone, tmp_path, monkeypatch,
                                                                   capsys):
    """`--resume` of a run that is still training (here from inside it, as a second writer: the lock
    is per open file, tl/engine/folder_lock.py; a real second process is the test below)."""
    seen = {}
    write_history_csv = tl.engine.run_folder.write_history_csv

    def second_writer_after_epoch_1(history, path):
        write_history_csv(history, path)
        if history.rows[-1]["epoch"] == 1 and not seen:
            before = _files(path.parent)
            capsys.readouterr()
            seen.update(code=main.main(["--resume", str(path.parent / "last.ckpt"), "--epochs", "5"]))
            seen.update(zip(("out", "err"), capsys.readouterr()), same=_files(path.parent) == before)

    monkeypatch.setattr(tl.engine.run_folder, "write_history_csv", second_writer_after_epoch_1)
    run_dir = _train(tiny_data, tmp_path / "runs", 2)
    assert seen["code"] == 2 and seen["out"] == "" and seen["same"], seen
    _names_holder(_one_error_line(seen["err"]), os.getpid(), "pytest")
    assert checkpoint.load_checkpoint(run_dir / "last.ckpt")["epoch"] == 2  # the first run finished undisturbed


def test_two_real_resumes_at_once_and_the_first_killed(tiny_data, tiny_backbone, tmp_path, capsys):
    """Two `python main.py --resume` of one run: the second stops, naming the first; the first,
    killed with SIGKILL mid-run (no word, no cleanup), leaves a folder that resumes."""
    run_dir = _train(tiny_data, tmp_path / "runs", 1)
    resume = [sys.executable, "tests/main_tiny.py", "--resume", str(run_dir / "last.ckpt"), "--no-progress"]
    with open(tmp_path / "first.log", "w") as log:  # it holds the folder, waiting after epoch 2
        first = subprocess.Popen([*resume, "--epochs", "5"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                 env=os.environ | {"TL_TEST_HOLD_EPOCH": "2"})
    try:
        while "holding after epoch 2" not in (tmp_path / "first.log").read_text():
            assert first.poll() is None, (tmp_path / "first.log").read_text()
            time.sleep(0.2)
        second = subprocess.run([*resume, "--epochs", "3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert first.poll() is None, "the first run ended before the second asked"
    finally:
        first.kill()  # SIGKILL
        first.wait()
    assert second.returncode == 2 and second.stdout == "", second
    _names_holder(_one_error_line(second.stderr), first.pid, f"main_tiny.py --resume {run_dir / 'last.ckpt'}")
    assert f"process {first.pid} (" in (run_dir / LOCK_NAME).read_text()  # the killed run's line is left behind
    assert checkpoint.load_checkpoint(run_dir / "last.ckpt")["epoch"] == 2
    code, out, err = _resume(capsys, run_dir, "--epochs", "3")
    assert code == 0, err


def test_commands_that_write_into_a_run_folder_stop_while_a_run_writes_it(tiny_data, tiny_backbone, tmp_path,
                                                                           capsys):
    """--evaluate (a file or the folder), --export and --explain write into the run's folder."""
    run_dir = _train(tiny_data, tmp_path / "runs", 1)
    photo = sorted((tiny_data / "val").rglob("*.png"))[0]
    commands = {"evaluate a file": ["--evaluate", run_dir / "best.pth", "--data", tiny_data],
                "evaluate the folder": ["--evaluate", run_dir, "--data", tiny_data],
                "export": ["--export", run_dir, "--data", tiny_data],
                "explain": ["--explain", photo, "--checkpoint", run_dir / "best.pth"]}
    capsys.readouterr()
    with one_writer(run_dir):
        before = _files(run_dir)
        for name, argv in commands.items():
            code = main.main([str(a) for a in argv])
            out, err = capsys.readouterr()
            assert code == 2 and out == "", name
            _names_holder(_one_error_line(err), os.getpid(), "pytest")
        assert _files(run_dir) == before
    assert main.main(["--evaluate", str(run_dir / "best.pth"), "--data", str(tiny_data)]) == 0  # released: it runs
    assert (run_dir / LOCK_NAME).read_text() == ""


# ----------------------------------------------------------------------------- its own checkpoints
def _no_identity(src: Path, dst: Path) -> Path:
    """A copy of a run folder as a run from before identities left it (config.json and
    last.ckpt without one; the digest written anew, as that code wrote it)."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    del config["identity"]
    (dst / "config.json").write_text(json.dumps(config))
    ckpt = checkpoint.load_checkpoint(dst / "last.ckpt")
    del ckpt["identity"], ckpt["config"]["identity"]
    ckpt["digest"] = tl.engine.files.state_digest(ckpt)
    torch.save(ckpt, dst / "last.ckpt")
    return dst


def test_a_checkpoint_of_another_run_is_refused_and_nothing_changes(tiny_data, tiny_backbone, tmp_path, capsys,
                                                                    own_cache_dir):
    own = _train(tiny_data, tmp_path / "own", 1)
    others = {  # whose last.ckpt is copied into a copy of `own`
        "same recipe, data and seed": _train(tiny_data, tmp_path / "twin", 1),
        "a later epoch of a twin": _train(tiny_data, tmp_path / "twin2", 2),
        "another seed": _train(tiny_data, tmp_path / "seed1", 1, "--seed", "1"),
        "another recipe": _train(tiny_data, tmp_path / "frozen", 1, recipe="resnet_frozen"),
        "from before identities": RUN,  # the committed run folder of earlier code
    }
    cases = {name: (own, other / "last.ckpt") for name, other in others.items()}
    old = _no_identity(own, tmp_path / "old")
    cases["into a folder from before identities"] = (old, own / "last.ckpt")
    cases["a folder without config.json"] = (own, None)
    for name, (folder, ckpt) in cases.items():
        work = tmp_path / "work" / name.replace(" ", "-")
        shutil.copytree(folder, work)
        if ckpt is not None:
            shutil.copyfile(ckpt, work / "last.ckpt")
        else:
            (work / "config.json").unlink()
            (work / LOCK_NAME).unlink()
        before = _files(work)
        code, out, err = _resume(capsys, work, "--epochs", "3", "--data", str(tiny_data))
        line = _one_error_line(err)
        assert code == 2 and _files(work) == before, name  # config.json, history.csv, best.pth: the same bytes
        if ckpt is None:
            assert "has no config.json" in line, line
        else:
            assert "is not this folder's checkpoint" in line and "resumes only its own checkpoints" in line, line
    # the copies' own folders still resume (each checkpoint in its own folder)
    assert _resume(capsys, old, "--epochs", "2")[0] == 0  # a folder from before identities: as it always did
    assert "identity" not in json.loads((old / "config.json").read_text())
    assert _resume(capsys, own, "--epochs", "2")[0] == 0


def test_the_committed_old_run_folder_resumes_its_old_checkpoint(tmp_path, tiny_backbone, own_cache_dir, capsys):
    shutil.copytree(RUN, tmp_path / "run")
    assert "identity" not in checkpoint.load_checkpoint(tmp_path / "run" / "last.ckpt")
    assert _resume(capsys, tmp_path / "run", "--epochs", "2", "--data", str(DATA))[0] == 0
    resumed = checkpoint.load_checkpoint(tmp_path / "run" / "last.ckpt")
    assert resumed["epoch"] == 2 and resumed["identity"] is None  # none is invented for it
    assert "identity" not in json.loads((tmp_path / "run" / "config.json").read_text())


def test_a_run_killed_between_its_checkpoint_and_its_other_files_resumes_exactly(tiny_data, tiny_backbone,
                                                                                   tmp_path, capsys, monkeypatch):
    """last.ckpt is written first; a kill right after it leaves config.json, history.csv and
    the epoch's weight files one epoch behind. The identity is the same, so it resumes, and
    the result equals the uninterrupted run's."""
    full = _train(tiny_data, tmp_path / "full", 3, "--save-every-epoch")
    save_checkpoint = checkpoint.save_checkpoint

    def killed_after_the_checkpoint_of_epoch_2(path, **kwargs):
        written = save_checkpoint(path, **kwargs)
        if kwargs["epoch"] == 2:
            raise KeyboardInterrupt  # the next write never happens
        return written

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "save_checkpoint", killed_after_the_checkpoint_of_epoch_2)
        half = _train(tiny_data, tmp_path / "half", 3, "--save-every-epoch", code=130)
    assert checkpoint.load_checkpoint(half / "last.ckpt")["epoch"] == 2
    with open(half / "history.csv") as f:
        assert max(int(row["epoch"]) for row in csv.DictReader(f)) == 1  # history.csv one epoch behind,
    assert not (half / "02.pth").exists() and "02.pth" not in json.loads((half / "config.json").read_text())[
        "checksums"]  # and the epoch's weight file and config.json too
    assert _resume(capsys, half, "--epochs", "3")[0] == 0
    a, b = checkpoint.load_checkpoint(full / "last.ckpt"), checkpoint.load_checkpoint(half / "last.ckpt")
    assert a["epoch"] == b["epoch"] == 3 and _strip(a["history"]["rows"]) == _strip(b["history"]["rows"])
    assert all(torch.equal(t, b["model"][k]) for k, t in a["model"].items())
    for name in ("best.pth", "01.pth", "02.pth", "03.pth"):
        ours, theirs = checkpoint.load_state_file(half / name), checkpoint.load_state_file(full / name)
        assert all(torch.equal(t, theirs[k]) for k, t in ours.items()), name


def test_a_run_whose_lock_file_is_deleted_stops_and_leaves_its_folder(tiny_data, tiny_backbone, tmp_path, capsys,
                                                                     monkeypatch):
    """Deleting .run.lock by hand lets a second --resume take the folder: the first run stops at
    its next write with one error line, and neither tidies nor overwrites the folder."""
    end_of_epoch = tl.engine.run_folder.RunFolder.end_of_epoch

    def delete_after_first(self, epoch, hist):
        stop = end_of_epoch(self, epoch, hist)
        if epoch == 1:
            (self.run_dir / LOCK_NAME).unlink()
        return stop

    monkeypatch.setattr(tl.engine.run_folder.RunFolder, "end_of_epoch", delete_after_first)
    run_dir = _train(tiny_data, tmp_path / "runs", 3, code=2)
    line = _one_error_line(capsys.readouterr().err)
    assert "was removed or replaced" in line and str(run_dir / LOCK_NAME) in line, line
    assert checkpoint.load_checkpoint(run_dir / "last.ckpt")["epoch"] == 1  # epoch 1 kept, nothing after it
    monkeypatch.setattr(tl.engine.run_folder.RunFolder, "end_of_epoch", end_of_epoch)
    assert _resume(capsys, run_dir, "--epochs", "2")[0] == 0


def test_sigterm_tidies_a_run_as_ctrl_c_does(tiny_data, tiny_backbone, tmp_path, capsys, monkeypatch):
    """`kill` (SIGTERM) before the first training epoch ends leaves no run folder; after it, the
    folder keeps its checkpoint and says how to go on; exit status 143 either way."""
    import signal

    end_of_epoch = tl.engine.run_folder.RunFolder.end_of_epoch
    for at, kept in ((0, False), (1, True)):
        def terminate_at(self, epoch, hist, _at=at):
            stop = end_of_epoch(self, epoch, hist)
            if epoch == _at:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the signal arrives first
            return stop

        monkeypatch.setattr(tl.engine.run_folder.RunFolder, "end_of_epoch", terminate_at)
        out = tmp_path / f"runs{at}"
        argv = ["-e", "resnet_scratch", "-b", "tiny", "--data", str(tiny_data), "--out", str(out), "--epochs", "2",
                "--weights", "none", "--image-size", "32", "--batch-size", "5", "--no-progress"]
        assert main.main(argv) == 143
        line = capsys.readouterr().err
        assert line.startswith("error: interrupted") and "Traceback" not in line, line
        if kept:
            (run_dir,) = out.iterdir()
            assert f"--resume {run_dir / 'last.ckpt'}" in line and (run_dir / LOCK_NAME).read_text() == ""
        else:
            assert not out.exists() and "nothing was saved" in line, line  # --out too: it made it (folders.py)


class _SignalWhenFreed:
    """Sends `signum` to this process when freed: its handler runs inside `__del__`, where Python
    swallows the KeyboardInterrupt it raises (as in the `os.fork` hooks of a DataLoader's start)."""

    def __init__(self, signum):
        self.signum = signum

    def __del__(self):
        os.kill(os.getpid(), self.signum)
        time.sleep(0.05)  # the handler runs here


@pytest.mark.parametrize("signum, then", [(15, None), (2, None), (15, "a worker gone")])
def test_an_interrupt_python_swallowed_stops_the_run_after_the_epoch(tiny_data, tiny_backbone, tmp_path, capsys,
                                                                    monkeypatch, signum, then):
    """Ctrl-C or SIGTERM whose exception Python swallows in epoch 2 stops the run once epoch 2 is
    saved, with the signal's exit status and the resume line; an error that follows it (a
    DataLoader worker it ended) is said as the interrupt too."""

    import tl.engine.images

    saved, read, end_of_epoch = [], tl.engine.images._open, tl.engine.run_folder.RunFolder.end_of_epoch

    def reading(path):
        if saved == [0, 1]:  # the first image of epoch 2
            saved.append("signalled")
            _SignalWhenFreed(signum)
            if then:
                raise RuntimeError("DataLoader worker (pid(s) 1234) exited unexpectedly")
        return read(path)

    def saving(self, epoch, hist):
        saved.append(epoch)
        return end_of_epoch(self, epoch, hist)

    monkeypatch.setattr(tl.engine.images, "_open", reading)
    monkeypatch.setattr(tl.engine.run_folder.RunFolder, "end_of_epoch", saving)
    reported = []  # Python's "Exception ignored" report (pytest's own hook would turn it into a warning)
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    out = tmp_path / "runs"
    argv = ["-e", "resnet_scratch", "-b", "tiny", "--data", str(tiny_data), "--out", str(out), "--epochs", "3",
            "--weights", "none", "--image-size", "32", "--batch-size", "5", "--workers", "0", "--no-progress"]
    with _python_sigint():
        code = main.main(argv)
    err = capsys.readouterr().err
    assert code == 128 + signum and out.is_dir(), (err, saved)
    (run_dir,) = out.iterdir()
    assert err.startswith("error: interrupted: ") and f"--resume {run_dir / 'last.ckpt'}" in err, err
    assert "Traceback" not in err and reported == []
    assert checkpoint.load_checkpoint(run_dir / "last.ckpt")["epoch"] == (1 if then else 2)


def _python_sigint():
    """Python's Ctrl-C handler for the block (a background job starts with SIGINT ignored)."""
    import contextlib
    import signal

    @contextlib.contextmanager
    def block():
        before = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, before)
    return block()


# ----------------------------------------------------------------------------- killed while writing its results
def _kill_at_config_with_results(patch):
    write_json = tl.engine.run_folder.write_json

    def killed(path, data, *args, **kwargs):
        if "results" in data:
            raise KeyboardInterrupt
        return write_json(path, data, *args, **kwargs)

    patch.setattr(tl.engine.run_folder, "write_json", killed)


def _kill_at(module, name):
    def patcher(patch):
        def killed(*args, **kwargs):
            raise KeyboardInterrupt

        patch.setattr(module, name, killed)
    return patcher


KILLED_WHILE_FINISHING = {  # where finish is killed, and the run it finishes: recipe, epochs, options
    "scoring the headline, scratch": (_kill_at(tl.engine.run_folder, "score_headline"), "resnet_scratch", 2, ()),
    "writing the report, frozen with an average": (_kill_at(tl.engine.metrics, "write_report"), "resnet_frozen", 2,
                                                    ("--ema", "0.5")),
    "drawing the pictures, stopped early": (_kill_at(tl.engine.plots, "write_run_plots"), "resnet_scratch", 6,
                                            ("--patience", "1", "--monitor", "acc")),
    "writing config.json last, fine-tune": (_kill_at_config_with_results, "resnet_finetune", 2, ()),
}


@pytest.mark.parametrize("kill, recipe, epochs, options", KILLED_WHILE_FINISHING.values(),
                         ids=KILLED_WHILE_FINISHING.keys())
def test_a_run_killed_while_writing_its_results_writes_them_on_resume(tiny_data, tiny_backbone, tmp_path, capsys,
                                                                     monkeypatch, kill, recipe, epochs, options):
    """Every epoch trained, then killed anywhere in `finish`: config.json holds no results yet (it
    is written last), so --resume restores the run and writes its results, the same as the
    uninterrupted run's; once they are written, a resume is refused."""
    full = _train(tiny_data, tmp_path / "full", epochs, *options, recipe=recipe)
    with monkeypatch.context() as patch:
        kill(patch)
        half = _train(tiny_data, tmp_path / "half", epochs, *options, recipe=recipe, code=130)
    said = capsys.readouterr().err
    assert said.startswith("error: interrupted while its results were written") and \
        f"--resume {half / 'last.ckpt'}" in said, said
    assert "results" not in json.loads((half / "config.json").read_text())
    before = _files(half)  # refused, the folder unchanged: fewer epochs than it trained; another total for
    for other_total in ["1", *([str(epochs + 4)] if "--patience" in options else [])]:  # a run that stopped early
        code, _, err = _resume(capsys, half, "--epochs", other_total)
        assert code == 2 and _files(half) == before and "--epochs" in _one_error_line(err), (other_total, err)
    code, out, _ = _resume(capsys, half)
    assert code == 0 and "writing the results it was stopped before writing" in out, out
    a, b = json.loads((full / "config.json").read_text()), json.loads((half / "config.json").read_text())
    wall = ("wall_seconds", "train_seconds", "train_images_per_s")
    assert {k: v for k, v in a["results"].items() if k not in wall} == \
        {k: v for k, v in b["results"].items() if k not in wall}
    for name in ("headline_predictions.csv", "classification_report.csv", "confused_pairs.csv"):
        assert (full / name).read_bytes() == (half / name).read_bytes(), name
    assert {p.name for p in full.glob("*.png")} == {p.name for p in half.glob("*.png")} != set()
    ca, cb = checkpoint.load_checkpoint(full / "last.ckpt"), checkpoint.load_checkpoint(half / "last.ckpt")
    assert ca["epoch"] == cb["epoch"] and ca["history"]["stopped_early"] == cb["history"]["stopped_early"]
    assert (cb["history"]["stopped_early"] is not None) == ("--patience" in options)  # this run did stop early
    assert _strip(ca["history"]["rows"]) == _strip(cb["history"]["rows"])  # no epoch trained again
    code, _, err = _resume(capsys, half)
    assert code == 2 and ("already trained all" in err or "stopped early" in err), err
