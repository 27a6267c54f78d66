"""tl/engine/command.py, the wrapper every command runs in, through the benchmarks: bad input or a
table that cannot be written is one `error:` line and exit status 2, never a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import write_image_folder
from tests.helpers import train_quick

ROOT = Path(__file__).resolve().parents[2]


def test_a_benchmark_given_bad_input_says_one_error_line_and_exits_2(tiny_data, tmp_path, capsys):
    """Every benchmark runs through benchmarks.command: a missing data folder, or a data set
    that is not the one a check needs, is an `error:` line and status 2, not a traceback."""
    from benchmarks import command, feature_batch, imagenet_heads

    assert command(lambda: feature_batch.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path)])) == 2
    assert capsys.readouterr().err.startswith("error: data folder not found")
    assert command(lambda: imagenet_heads.main(["--data", str(tiny_data), "--backbones", "efficientnet_lite0",
                                                "--out", str(tmp_path)])) == 2
    assert "needs hymenoptera's ants and bees" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.md"))  # nothing written


BENCHMARKS = {  # each benchmark that measures before it writes, with its arguments besides --out (DATA: --data)
    "feature_batch": ["--data", "DATA", "--backbone", "tiny", "--weights", "none", "--batch-sizes", "2"],
    "blind_sizes": ["--data", "DATA", "--sizes", "32"],
    "imagenet_heads": ["--data", "DATA", "--backbones", "efficientnet_lite0"],
    "bench": ["--data", "DATA", "--cases", "1", "--repeats", "1", "--skip-memory", "--skip-frozen"],
    "growth": ["--sizes", "10", "20"],
    "peers": ["--data", "DATA", "--seeds", "0"],
}


@pytest.mark.parametrize("name", BENCHMARKS)
def test_a_benchmark_that_cannot_write_its_table_stops_before_it_measures(name, unwritable, tiny_backbone, tiny_data,
                                                                         capsys, monkeypatch):
    """One error: line naming the folder, and not one photo read (or, for growth, made) first
    (tl.engine.files.writable_folder)."""
    import importlib

    from benchmarks import command
    from tests import conftest

    module = importlib.import_module(f"benchmarks.{name}")
    main = module.main
    if name == "growth":  # it makes its own photos
        monkeypatch.setattr(module, "make_images", lambda *a: pytest.fail("growth made photos first"))
    argv = [str(tiny_data) if a == "DATA" else a for a in BENCHMARKS[name]] + ["--out", str(unwritable)]
    conftest._SEEN.clear()
    conftest._WATCHED[:] = [tiny_data.resolve()]
    try:
        code = command(lambda: main(argv))
    finally:
        conftest._WATCHED.clear()
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1 and str(unwritable.parent) in err, err
    assert not conftest._SEEN, f"{name} read the data before it found --out unwritable: {conftest._SEEN[:2]}"


# ----------------------------------------------------------------------------- SIGTERM, and what to change
def test_sigterm_is_taken_as_ctrl_c_with_its_own_status_and_the_handler_comes_back(capsys):
    from tl import Interrupted
    from tl.engine.command import command

    def terminated():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal arrives first

    def terminated_in_training():
        try:
            terminated()
        except KeyboardInterrupt:
            raise Interrupted("interrupted: last.ckpt holds the last completed epoch") from None

    before = signal.getsignal(signal.SIGTERM)
    assert command(terminated, interrupted="interrupted; nothing changed") == 143
    assert capsys.readouterr().err == "error: interrupted; nothing changed\n"
    assert command(terminated_in_training) == 143
    assert capsys.readouterr().err == "error: interrupted: last.ckpt holds the last completed epoch\n"
    assert command(lambda: (_ for _ in ()).throw(KeyboardInterrupt)) == 130  # Ctrl-C keeps 130
    assert signal.getsignal(signal.SIGTERM) == before


def _stopped(tmp_path: Path, argv: list) -> tuple[int, str]:
    """Run main.py's `argv` with slow image opening (tests/group_sigterm_main.py) in a process
    group of its own, send SIGTERM to the whole group once a worker opens an image, and return
    (exit status, stderr)."""
    log, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(log, "w") as out, open(err, "w") as errors:
        child = subprocess.Popen([sys.executable, str(ROOT / "tests" / "group_sigterm_main.py"), *map(str, argv)],
                                 cwd=ROOT, stdout=out, stderr=errors, start_new_session=True,
                                 env={**os.environ, "TL_CACHE_DIR": str(tmp_path / "cache")})
    try:
        deadline = time.monotonic() + 120
        while "a worker opens an image" not in log.read_text():
            assert child.poll() is None and time.monotonic() < deadline, (log.read_text(), err.read_text())
            time.sleep(0.05)
        os.killpg(child.pid, signal.SIGTERM)
        return child.wait(timeout=60), err.read_text()
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()


@pytest.mark.parametrize("what", ["training", "feature cache", "predictions", "search"])
def test_sigterm_that_reaches_the_dataloader_workers_too_is_one_error_line_and_143(what, tiny_backbone, pretrained,
                                                                                   tmp_path):
    """A job scheduler or `kill -- -PGID` stops the DataLoader's worker processes with the command:
    exit 143 and its one `error:` line, no traceback."""
    data = write_image_folder(tmp_path / "data", train=30, val=30)
    common = ["-b", "tiny", "--data", data, "--workers", "2", "--no-progress"]
    argv = {"training": ["-e", "resnet_scratch", "--epochs", "3", "--out", tmp_path / "runs", *common],
            "feature cache": ["-e", "resnet_frozen", "--weights", pretrained, "--feature-cache", "--epochs", "3",
                              "--out", tmp_path / "runs", *common]}.get(what)
    if what == "predictions":
        run_dir = train_quick(data, tmp_path / "quick")
        argv = ["--predict", data / "val", "--checkpoint", run_dir / "best.pth", "--csv", tmp_path / "table.csv",
                "--workers", "2", "--no-progress"]
    if what == "search":
        argv = ["tune", "--recipe", "modern_finetune", "--trials", "1", "--storage", tmp_path / "study.db",
                "--weights", pretrained, "--out", tmp_path / "pages", "--tuned-dir", tmp_path / "tuned",
                "--runs-dir", tmp_path / "trials", "--backbone", "tiny", "--data", data, "--workers", "2"]
    code, err = _stopped(tmp_path, argv)
    assert (code, len(err.splitlines())) == (143, 1) and err.startswith("error: interrupted"), err
    if what == "predictions":  # a command that trains nothing says nothing of training
        assert err == "error: interrupted\n"
    if what == "search":
        import optuna

        from tl.engine.trials import failures

        study = optuna.load_study(study_name=None, storage=f"sqlite:///{tmp_path / 'study.db'}")
        assert failures(study)[0].startswith("interrupted (SIGTERM)")


@pytest.mark.parametrize("second", ["SIGTERM", "SIGINT"])
def test_a_second_signal_while_the_first_tidies_up_is_the_same_request(second, tiny_data, tiny_backbone, tmp_path,
                                                                      capsys, monkeypatch):
    """SIGTERM in epoch 2, then a second signal a moment later while the run folder is tidied (a
    scheduler that signals each process, a second Ctrl-C): the first one is said, with its exit
    status and the resume line."""
    import main
    import tl.engine.run_folder
    from tl.engine import checkpoint

    end_of_epoch, load = tl.engine.run_folder.RunFolder.end_of_epoch, checkpoint.load_checkpoint

    def terminated_after(self, epoch, hist):
        stop = end_of_epoch(self, epoch, hist)
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the signal arrives first
        return stop

    def loading_under_a_second_signal(path, *args, **kwargs):
        os.kill(os.getpid(), getattr(signal, second))
        time.sleep(0.05)  # the handler runs here
        return load(path, *args, **kwargs)

    monkeypatch.setattr(tl.engine.run_folder.RunFolder, "end_of_epoch", terminated_after)
    monkeypatch.setattr(tl.engine.run_folder.checkpoint, "load_checkpoint", loading_under_a_second_signal)
    out = tmp_path / "runs"
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, not a background job
    try:
        code = main.main(["-e", "resnet_scratch", "-b", "tiny", "--data", str(tiny_data), "--out", str(out),
                          "--epochs", "3", "--weights", "none", "--image-size", "32", "--batch-size", "5",
                          "--no-progress"])
    finally:
        signal.signal(signal.SIGINT, before)
    err = capsys.readouterr().err
    (run_dir,) = out.iterdir()
    assert code == 143 and err.startswith("error: interrupted: ") and f"--resume {run_dir / 'last.ckpt'}" in err, err


class _HalfBuilt:
    """An object whose __init__ an interrupt stopped, and whose __del__ then fails (as a
    DataLoader's iterator stopped before it records its workers)."""

    def __init__(self, freed: list):
        self.freed = freed
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises here
        self.complete = True

    def __del__(self):
        self.freed.append(True)
        assert self.complete


def test_what_fails_of_the_interrupt_is_not_reported_and_the_interrupt_is_said(monkeypatch, capsys):
    """An object the interrupt left half-built ends as the block ends, and its failure is not
    printed ("Exception ignored"); an error raised as the interrupt unwinds (PyTorch's SIGCHLD
    handler, for a worker the same SIGTERM ended) is said as the interrupt: 143, one line."""
    from tl.engine.command import command, interrupts_noted

    reported, freed = [], []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    with pytest.raises(KeyboardInterrupt), interrupts_noted():
        _HalfBuilt(freed)
    assert freed == [True] and reported == []

    def a_worker_ended(signum, frame):
        raise RuntimeError("DataLoader worker (pid 1234) is killed by signal: Terminated.")

    def stopped_with_its_workers():
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD, signal.SIGTERM})
        signal.pthread_kill(threading.get_ident(), signal.SIGCHLD)  # this thread's, held by the mask
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD, signal.SIGTERM})  # both at once
        time.sleep(5)

    before = signal.signal(signal.SIGCHLD, a_worker_ended)
    try:
        assert command(stopped_with_its_workers) == 143
    finally:
        signal.signal(signal.SIGCHLD, before)
    assert capsys.readouterr().err == "error: interrupted\n" and reported == []


def test_a_process_forked_under_the_sigterm_handler_ends_quietly_on_sigterm():
    """A DataLoader worker inherits the command's handler until it sets its own: there SIGTERM
    ends it with status 0, and raises nothing in it."""
    from tl.engine.command import interrupts_noted

    with interrupts_noted():
        pid = os.fork()
        if pid == 0:  # the child
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            finally:
                os._exit(3)
    assert os.waitpid(pid, 0)[1] == 0


def test_a_failed_write_names_the_commands_own_place_for_outputs_or_the_cache(tmp_path, monkeypatch):
    import errno

    from tl.engine.command import message

    monkeypatch.setenv("TL_CACHE_DIR", str(tmp_path / "cache"))
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        for outputs in ("--out", "--dest", "copy the run folder to a writable disk"):
            text = message(OSError(code, "x", str(tmp_path / "out" / "a.csv")), outputs)
            assert text.endswith(f"({outputs})") and "TL_CACHE_DIR" not in text, text
            cached = message(OSError(code, "x", str(tmp_path / "cache" / "features" / "k.pt")), outputs)
            assert cached.endswith("(TL_CACHE_DIR)") and outputs not in cached, cached


def test_a_failed_write_names_the_option_whose_path_holds_the_file(tmp_path, monkeypatch):
    """The deepest option of the command line whose path holds the file that could not be written
    (--runs-dir, --tuned-dir, --csv=..., --storage), else the command's own `outputs`."""
    import errno
    import sys

    from tl.engine.command import message

    argv = ["prog", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--runs-dir", str(tmp_path / "r"),
            f"--tuned-dir={tmp_path / 'o' / 'tuned'}", "--csv", str(tmp_path / "t.csv"), "--quick"]
    monkeypatch.setattr(sys, "argv", argv)
    cases = {tmp_path / "r" / "data" / "run" / "last.ckpt": "--runs-dir", tmp_path / "o" / "tuned" / "x.json":
             "--tuned-dir", tmp_path / "o" / "summary.csv": "--out", tmp_path / "t.csv": "--csv",
             tmp_path / "elsewhere" / "x.png": "--out"}
    for path, option in cases.items():
        assert message(OSError(errno.ENOSPC, "x", str(path)), "--out").endswith(f"({option})"), path
    # a sentence of advice (a resumed run's folder) is kept: the option there is a file in that folder
    advice = "copy the run folder to a writable disk"
    assert message(OSError(errno.ENOSPC, "x", str(tmp_path / "r" / "x")), advice).endswith(f"({advice})")


def test_names_that_are_not_utf8_print_escaped_not_as_a_crash(capsys):
    import os

    from tl.engine.command import command

    names = [os.fsdecode(b) for b in (b"caf\xe9", b"\xff\xfe", b"\xed\xa0\x80")]  # surrogate-escaped, as os gives
    assert command(lambda: [print(f"data: {n}") for n in names] and None) == 0
    assert capsys.readouterr().out.splitlines() == ["data: caf\\udce9", "data: \\udcff\\udcfe",
                                                    "data: \\udced\\udca0\\udc80"]


NAMED = "x\ny\x1b[31m\r\u202e"  # a line feed, a colour escape, a carriage return, a bidi override


def _error_lines(capsys, argv) -> list[str]:
    from tests.helpers import cli_exit

    code, out, err = cli_exit(capsys, *argv)
    assert code == 2, err
    return err.splitlines()


def test_an_error_naming_a_path_with_line_feeds_and_escapes_keeps_its_lines(tiny_data, tiny_backbone, tmp_path,
                                                                              capsys):
    """Paths and files named with a line feed, a terminal escape, a carriage return and a bidi
    override, in the error: lines of several commands (a missing data folder, a missing
    checkpoint to resume or evaluate, --out under a file): as many lines as the same error about
    a plain name (the message's own advice lines), the names escaped, no escape reaching the terminal."""
    def cases(name: str) -> dict:
        (tmp_path / f"file{name}").write_text("a file, not a folder")
        return {
            "missing data": ["-e", "resnet_scratch", "-b", "tiny", "--data", tmp_path / f"no{name}", "--quick"],
            "missing checkpoint": ["--resume", tmp_path / f"run{name}" / "last.ckpt"],
            "missing weights": ["--evaluate", tmp_path / f"w{name}.pth", "--data", tiny_data],
            "out under a file": ["-e", "resnet_scratch", "-b", "tiny", "--data", tiny_data, "--quick", "--out",
                                 tmp_path / f"file{name}" / "runs"],
        }

    plain = {case: _error_lines(capsys, argv) for case, argv in cases("plain").items()}
    for case, argv in cases(NAMED).items():
        lines = _error_lines(capsys, argv)
        assert len(lines) == len(plain[case]) and lines[0].startswith("error: "), (case, lines)
        assert "x\\ny\\x1b[31m\\r\\u202e" in "\n".join(lines) and "\x1b" not in "\n".join(lines), (case, lines)


def test_an_errors_own_advice_line_is_kept():
    from tl.engine.command import shown

    assert shown(f"cannot read {NAMED}\n  try --format onnx") == \
        "cannot read x\\ny\\x1b[31m\\r\\u202e\n  try --format onnx"


def test_a_message_of_several_error_lines_keeps_them():
    """A hand-edited file with two violations is two `error:` lines (tl/engine/schema.py)."""
    from tl.engine.command import shown

    assert shown("f.json: epochs = 0 is below 1\nerror: f.json: lr = -1 is below 0").splitlines() == \
        ["f.json: epochs = 0 is below 1", "error: f.json: lr = -1 is below 0"]


def test_what_a_command_prints_shows_a_names_escapes_and_keeps_its_lines(tiny_data, tiny_backbone, tmp_path, capsys):
    """A run whose --out is named with a colour escape, a carriage return and a bidi override, and
    a command body printing such a name: stdout holds none of them raw, and keeps its line breaks."""
    from tests.helpers import cli
    from tl.engine.command import command

    code, out, _ = cli(capsys, "-e", "resnet_scratch", "-b", "tiny", "--data", tiny_data, "--quick", "--no-progress",
                       "--out", tmp_path / "o\x1b[31mut\rx\u202e")
    assert code == 0 and "o\\x1b[31mut\\rx\\u202e" in out
    assert command(lambda: print("a\x1b[31m\r\u202e\tb\nc")) == 0
    out += capsys.readouterr().out
    assert "a\\x1b[31m\\r\\u202e\tb\nc\n" in out and not [c for c in out if c in "\x1b\r\u202e"]


def test_a_line_feed_in_a_name_given_on_the_command_line_stays_inside_its_line(tiny_data, tiny_backbone, tmp_path,
                                                                                capsys, monkeypatch):
    """A data folder and output folders whose names hold a line feed, given as `--data DIR`, `--out
    DIR` and `--out=DIR`, and a folder named by a line feed alone: training (its run folder and
    headline lines name them) and a comparison (its progress lines name the data set) print as
    many lines as with plain names, each line feed shown as \\n."""
    import shutil

    from experiments import compare_all
    from tests.helpers import cli
    from tl.engine.command import command

    monkeypatch.chdir(tmp_path)  # relative names: `--out=ru\nns` is the option and its folder in one argument

    def printed(name: str) -> str:
        data = shutil.copytree(tiny_data, f"da{name}ta")
        code, out, _ = cli(capsys, "-e", "resnet_scratch", "-b", "tiny", "--data", data, "--quick", "--no-progress",
                           f"--out=ru{name}ns/{name}/x")
        assert code == 0
        argv = ["--quick", "--data", data, "--experiments", "resnet_scratch", "--backbone", "tiny", "--seeds", "0",
                "--workers", "0", "--out", str(tmp_path / f"res{name}ults"), "--runs-dir", f"r{name}"]
        assert command(lambda: compare_all.main(argv), argv=argv) == 0
        return out + capsys.readouterr().out

    plain, named = printed("_"), printed("\n")
    assert len(named.splitlines()) == len(plain.splitlines()), named
    assert "da\\nta" in named and "ru\\nns/\\n/x" in named and "res\\nults" in named, named
    assert "da\nta" not in named and "ru\nns" not in named


def test_only_the_command_wrapper_prints_error_lines():
    """Every error: line goes through tl.engine.command (say_error, or command() itself), which
    shows the names in it on their lines: a code check over the project's commands."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    sources = [*root.glob("*.py"), *(p for d in ("tl", "experiments", "benchmarks") for p in (root / d).rglob("*.py"))]
    printing = re.compile(r"""print\(\s*f?["']error:""")
    found = [f"{p.relative_to(root)}" for p in sources if p.name != "command.py" and printing.search(p.read_text())]
    assert found == []
    assert printing.search('print(f"error: {x}", file=sys.stderr)')  # the check sees a planted one
