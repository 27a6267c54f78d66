"""tl/engine/progress.py: every pass of the machinery that can take long shows a bar on stderr
(the check of a data folder's files, the feature pass, the image cache, scoring, the scan and
classification of --predict DIR, the check of an exported model), and --no-progress (or
RunOptions.progress=False) silences every one of them. On tiny data every pass ends before a
bar's delay; the tests but the last show bars at once (DELAY 0)."""

from __future__ import annotations

import re

import pytest

import main
from tests.conftest import write_image_folder
from tl.engine import progress as progress_module
from tl.engine.progress import progress, progress_shown, show_progress

# what each pass writes on stderr when it shows its bar
TRAINING_BARS = {"the check of a data folder": "checking ", "the feature pass": "features of ",
                 "the image cache": "decoding ", "scoring the headline": "scoring "}
EVALUATE_BARS = {"the check of a data folder": "checking ", "scoring": "scoring "}
PREDICT_BARS = {"the scan of a folder": "scanning ", "classifying": "classifying "}
EXPORT_BARS = {"the check of the exported model": "checking the exported model"}
A_BAR = re.compile(r"\[\d\d:\d\d")  # every tqdm bar shows its elapsed time: "... 3/12 [00:01<00:03, ..."


def cli(capfd, *argv) -> tuple[int, str]:
    code = main.main([str(a) for a in argv])
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    return code, err


def run_the_commands(capfd, tmp_path, *flags) -> dict[str, str]:
    """A frozen run (features of val, decoded train images), --evaluate of its best.pth,
    --predict of a folder and --export, each with `flags`: the stderr of each."""
    data = write_image_folder(tmp_path / "data", train=6, val=4)
    runs = tmp_path / "runs"
    code, train = cli(capfd, "-e", "resnet_frozen", "-b", "tiny", "--weights", "none", "--data", data, "--epochs",
                      "1", "--out", runs, "--workers", "0", "--image-size", "32", "--image-cache", *flags)
    assert code == 0, train
    (run,) = runs.iterdir()
    code, evaluate = cli(capfd, "--evaluate", run / "best.pth", "--data", data, *flags)
    assert code == 0, evaluate
    code, predict = cli(capfd, "--predict", data / "val", "--checkpoint", run / "best.pth", "--csv",
                        tmp_path / "table.csv", "--workers", "0", *flags)
    assert code == 0, predict
    code, export = cli(capfd, "--export", run, "--format", "torchscript", *flags)
    assert code == 0, export
    return {"train": train, "evaluate": evaluate, "predict": predict, "export": export}


@pytest.fixture(autouse=True)
def bars_on(monkeypatch):
    monkeypatch.setattr(progress_module, "DELAY", 0)  # a bar from a pass's start, however short
    show_progress(True)  # whatever a test before left
    yield
    show_progress(True)


def test_every_long_pass_of_a_command_shows_a_bar_on_stderr(tiny_backbone, tmp_path, capfd):
    err = run_the_commands(capfd, tmp_path)
    for command, bars in (("train", TRAINING_BARS), ("evaluate", EVALUATE_BARS), ("predict", PREDICT_BARS),
                          ("export", EXPORT_BARS)):
        for what, text in bars.items():
            assert text in err[command], f"{command}: no bar for {what} on stderr:\n{err[command]}"


def test_no_progress_silences_every_bar_of_every_command(tiny_backbone, tmp_path, capfd):
    err = run_the_commands(capfd, tmp_path, "--no-progress")
    for command, text in err.items():
        assert not A_BAR.search(text), f"{command} --no-progress drew a bar:\n{text}"
        assert not any(bar in text for bar in {*TRAINING_BARS.values(), *PREDICT_BARS.values(),
                                               *EXPORT_BARS.values()}), text
    assert progress_module.progress_enabled()  # the switch is main.py's for one command, not the process's


def test_a_run_with_progress_false_in_its_options_shows_no_bar(tiny_backbone, tmp_path, capfd):
    """A library caller (compare_all, tune) silences a run by its RunOptions, the machinery's bars included."""
    from experiments import get_experiment
    from tl.engine.options import RunOptions
    from tl.engine.run import run

    module = get_experiment("resnet_frozen")
    opts = RunOptions(data=write_image_folder(tmp_path / "data", train=6, val=4), backbone="tiny", weights="none",
                      epochs=1, workers=0, image_size=32, out=tmp_path / "runs", progress=False, plots=False)
    run(module.RECIPE, module.build, opts, log=lambda s: None)
    err = capfd.readouterr().err
    assert not A_BAR.search(err) and "features of" not in err and "checking" not in err, err
    assert progress_module.progress_enabled()  # restored after the run


@pytest.mark.parametrize("silence", ["show_progress", "progress_shown", "enabled"])
def test_each_switch_silences_the_wrapper_and_is_restored(silence, capfd):
    def consume():
        return sum(progress(range(5), "counting", unit=" things"))

    assert consume() == 10 and "counting" in capfd.readouterr().err
    if silence == "show_progress":
        show_progress(False)
        assert consume() == 10
    elif silence == "progress_shown":
        with progress_shown(False):
            assert consume() == 10
        assert "counting" not in capfd.readouterr().err
        assert consume() == 10 and "counting" in capfd.readouterr().err  # restored after the block
        show_progress(False)
        with progress_shown(True):  # a block can only turn bars off, never back on
            assert consume() == 10
    else:
        assert sum(progress(range(5), "counting", enabled=False)) == 10
    assert "counting" not in capfd.readouterr().err
    show_progress(True)
    assert consume() == 10 and "counting" in capfd.readouterr().err  # on again


def test_a_count_without_a_length_is_shown(capfd):
    assert list(progress((x for x in "abc"), "scanning somewhere", unit=" files")) == ["a", "b", "c"]
    assert re.search(r"scanning somewhere: \d+ files \[", capfd.readouterr().err)


def test_a_pass_shorter_than_the_delay_shows_nothing_and_a_longer_one_a_bar(monkeypatch, capfd):
    import time

    monkeypatch.setattr(progress_module, "DELAY", 2.0)
    assert sum(progress(range(100), "quick")) == 4950
    assert capfd.readouterr().err == ""  # a quick scan's output stays as it was
    monkeypatch.setattr(progress_module, "DELAY", 0.05)
    for _ in progress(range(5), "slow", unit=" files"):
        time.sleep(0.03)
    assert re.search(r"slow: +\d+%.*\[", capfd.readouterr().err)


def test_a_bar_naming_a_folder_shows_its_control_characters_as_escapes(capfd):
    """A bar's text names the data folder it checks or decodes: a line feed, a colour escape or a
    bidi mark in that name is shown as its escape (tqdm's own carriage returns still redraw the bar)."""
    from tl.engine.class_names import one_line

    for name in ("da\nta", "da\x1b[31mta", "da\u202eta"):
        assert sum(progress(range(3), f"checking {name}", unit=" files")) == 3
        err = capfd.readouterr().err
        assert f"checking {one_line(name)}" in err and "\\" in one_line(name), err
        assert name not in err
